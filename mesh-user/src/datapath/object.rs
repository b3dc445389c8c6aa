//! The eBPF object the agent loads: the programs built into this binary, with the running
//! kernel's kfunc ids written into their instructions (`mesh_common::kfunc`).

use std::ops::Range;

use anyhow::{Context as _, bail, ensure};
use mesh_common::kfunc::{self, KfuncIds};
use object::{Object as _, ObjectSection as _, SectionKind};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// An ELF image in 8-byte aligned memory (the ELF reader wants its headers aligned).
pub struct EbpfObject {
    words: Vec<u64>,
    len: usize,
}

impl EbpfObject {
    /// The programs built in, completed with `ids`.
    pub fn for_kernel(ids: KfuncIds) -> anyhow::Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("this mesh binary was built with AYA_BUILD_SKIP=1 and has no eBPF programs");
        }
        let mut object = Self::copy_of(EBPF_OBJECT);
        let patched = object.patch(ids)?;
        ensure!(
            patched > 0,
            "the eBPF object has no kfunc call to complete: built from other sources?"
        );
        Ok(object)
    }

    fn copy_of(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_ne_bytes(buf);
        }
        Self {
            words,
            len: bytes.len(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes of the words' own allocation; u8 has no alignment or validity
        // requirements.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len) }
    }

    /// Writes `ids` into the placeholders of every program section; how many it wrote.
    fn patch(&mut self, ids: KfuncIds) -> anyhow::Result<usize> {
        let text = program_sections(self.bytes())?;
        let bytes = self.bytes_mut();
        Ok(text
            .into_iter()
            .map(|range| kfunc::patch(&mut bytes[range], ids))
            .sum())
    }
}

/// File ranges of the object's program (text) sections.
fn program_sections(elf: &[u8]) -> anyhow::Result<Vec<Range<usize>>> {
    let file = object::File::parse(elf).context("parsing the eBPF object")?;
    let mut ranges = Vec::new();
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let Some((offset, size)) = section.file_range() else {
            continue;
        };
        let start = usize::try_from(offset)?;
        let end = start + usize::try_from(size)?;
        ensure!(
            start.is_multiple_of(8) && end <= elf.len(),
            "program section {} at byte {start} is not 8-byte aligned or out of bounds",
            section.name().unwrap_or("?")
        );
        ranges.push(start..end);
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_programs_carry_placeholders_only_in_their_text() {
        if EBPF_OBJECT.is_empty() {
            panic!("built with AYA_BUILD_SKIP=1: the unit tests need the programs");
        }
        let ids = KfuncIds {
            rdonly_cast: 1,
            tcp_sock: 2,
        };
        let mut object = EbpfObject::copy_of(EBPF_OBJECT);
        assert_eq!(object.bytes(), EBPF_OBJECT);
        let patched = object.patch(ids).expect("patch");
        assert!(
            patched >= 2 && patched.is_multiple_of(2),
            "{patched} instructions"
        );
        // Nothing outside the program sections changed, and no placeholder is left anywhere.
        let changed = object
            .bytes()
            .iter()
            .zip(EBPF_OBJECT)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            changed > 0 && changed <= patched * 4,
            "{changed} bytes changed"
        );
        let mut again = EbpfObject::copy_of(object.bytes());
        assert_eq!(kfunc::patch(again.bytes_mut(), ids), 0);
    }
}
