//! Re-reading an edited config file in time proportional to the edit: the text is cut at its
//! top-level `[[services]]` headers and only the pieces that changed since the last read are
//! parsed again. A 10k-service file is about 3 MB, which toml takes over 100 ms to parse whole.
//!
//! The cut is made only where it cannot change the meaning: every header after the first
//! `[[services]]` must belong to a service (`[services.…]`, `[[services.…]]`) and the file must
//! hold no multi-line string (which could contain a line that looks like a header). Anything
//! else, and any error, is parsed whole, so messages are exactly those of `parse`.

use std::collections::HashMap;

use serde::Deserialize;

use super::{AgentConfig, Config, ConfigError, ServiceConfig};

/// The pieces of the last text read, parsed.
#[derive(Debug, Default)]
pub struct Reparser {
    head: Option<(String, AgentConfig)>,
    /// The last text and, per `[[services]]` piece of it, its range and its service.
    text: String,
    pieces: Pieces,
}

type Pieces = Vec<(std::ops::Range<usize>, ServiceConfig)>;

/// Pieces parsed again before the rest are looked up by their text.
const MISSES_BEFORE_LOOKUP: usize = 16;

/// A piece of the file that is one `[[services]]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OneService {
    services: [ServiceConfig; 1],
}

impl Reparser {
    /// Parses `text` like `parse`, reusing the services of unchanged pieces. Services are not
    /// validated (the registry checks what changed); `[agent]` is, when its piece changed.
    pub fn parse(&mut self, text: String, origin: &str) -> Result<Config, ConfigError> {
        match self.parse_pieces(&text, origin) {
            Some(pieces) => {
                let services = pieces.iter().map(|(_, svc)| svc.clone()).collect();
                let agent = self
                    .head
                    .as_ref()
                    .map(|(_, a)| a.clone())
                    .unwrap_or_default();
                self.text = text;
                self.pieces = pieces;
                Ok(Config { agent, services })
            }
            None => {
                *self = Self::default();
                let config: Config =
                    toml::from_str(&text).map_err(|source| ConfigError::Parse {
                        origin: origin.to_owned(),
                        source,
                    })?;
                agent_only(&config.agent).validate(origin)?;
                Ok(config)
            }
        }
    }

    /// The pieces of `text` with their services (the head is kept in `self.head`); `None`:
    /// the text cannot be cut safely, or a piece did not parse.
    fn parse_pieces(&mut self, text: &str, origin: &str) -> Option<Pieces> {
        let (head, ranges) = cut(text)?;
        if self.head.as_ref().is_none_or(|(seen, _)| seen != head) {
            self.head = None;
            let config: Config = toml::from_str(head).ok()?;
            if !config.services.is_empty() {
                return None;
            }
            agent_only(&config.agent).validate(origin).ok()?;
            self.head = Some((head.to_owned(), config.agent));
        }
        // The old services are moved, not copied, into the new pieces (10k clones per edit
        // otherwise); on None the caller starts from scratch anyway.
        let (old_ranges, mut old_services): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pieces)
            .into_iter()
            .map(|(range, svc)| (range, Some(svc)))
            .unzip();
        let old_len = old_ranges.len();
        let old_piece = |at: usize| &self.text[old_ranges[at].clone()];
        // Most edits leave the pieces where they were, counted from the start or (after an
        // insertion or a removal) from the end; only after many misses are the others looked
        // up by their text (hashing 3 MB costs more than parsing a few pieces).
        let (new_len, mut misses) = (ranges.len(), 0);
        let mut by_text: Option<HashMap<&str, usize>> = None;
        let mut pieces = Vec::with_capacity(new_len);
        for (at, range) in ranges.into_iter().enumerate() {
            let piece = &text[range.clone()];
            let from_end = (at + old_len).checked_sub(new_len);
            let mut known = [Some(at), from_end]
                .into_iter()
                .flatten()
                .find(|&old| old < old_len && old_piece(old) == piece);
            if known.is_none() {
                misses += 1;
                if misses > MISSES_BEFORE_LOOKUP {
                    let by_text = by_text.get_or_insert_with(|| {
                        (0..old_len).map(|at| (old_piece(at), at)).collect()
                    });
                    known = by_text.get(piece).copied();
                }
            }
            // A piece whose text appears twice was taken by the first: parsed again.
            let svc = known.and_then(|at| old_services[at].take());
            pieces.push((range, svc));
        }
        parse_missing(text, &mut pieces)?;
        Some(
            pieces
                .into_iter()
                .map(|(range, svc)| (range, svc.expect("parsed above")))
                .collect(),
        )
    }
}

/// Below this many pieces to parse, one thread parses them (an edit); above, the pieces are
/// split over the CPUs (a start: every piece, 3 MB at 10k services).
const PARALLEL_PARSE_MIN: usize = 512;

/// Parses the pieces that have no service yet; `None` if one does not parse.
fn parse_missing(
    text: &str,
    pieces: &mut [(std::ops::Range<usize>, Option<ServiceConfig>)],
) -> Option<()> {
    let parse = |chunk: &mut [(std::ops::Range<usize>, Option<ServiceConfig>)]| {
        for (range, svc) in chunk.iter_mut().filter(|(_, svc)| svc.is_none()) {
            let [parsed] = toml::from_str::<OneService>(&text[range.clone()])
                .ok()?
                .services;
            *svc = Some(parsed);
        }
        Some(())
    };
    let missing = pieces.iter().filter(|(_, svc)| svc.is_none()).count();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if missing < PARALLEL_PARSE_MIN || threads == 1 {
        return parse(pieces);
    }
    let chunk = pieces.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = pieces
            .chunks_mut(chunk)
            .map(|part| scope.spawn(move || parse(part)))
            .collect();
        // Every part is joined before the result is looked at; any failure fails the whole.
        let results: Vec<Option<()>> = parts
            .into_iter()
            .map(|part| part.join().ok().flatten())
            .collect();
        results.into_iter().collect()
    })
}

fn agent_only(agent: &AgentConfig) -> Config {
    Config {
        agent: agent.clone(),
        services: Vec::new(),
    }
}

/// The text before the first `[[services]]` line, and the range of each `[[services]]` table.
///
/// Only lines whose first non-blank character is `[` matter, so the scan jumps from `[` to
/// `[` (memchr); a 10k-service file is about 50,000 lines, of which 10,000 are headers.
fn cut(text: &str) -> Option<(&str, Vec<std::ops::Range<usize>>)> {
    let bytes = text.as_bytes();
    if memchr::memmem::find(bytes, b"'''").is_some()
        || memchr::memmem::find(bytes, b"\"\"\"").is_some()
    {
        return None;
    }
    let mut starts = Vec::new();
    // The line of the previous `[`: a line with many is scanned back once, not once per `[`.
    let (mut seen, mut line_start) = (0, 0);
    for at in memchr::memchr_iter(b'[', bytes) {
        if let Some(nl) = memchr::memrchr(b'\n', &bytes[seen..at]) {
            line_start = seen + nl + 1;
        }
        seen = at;
        // Not the line's first non-blank character: a value, or the second `[` of `[[`.
        if !text[line_start..at].trim().is_empty() {
            continue;
        }
        let line_end = memchr::memchr(b'\n', &bytes[at..]).map_or(bytes.len(), |nl| at + nl);
        let trimmed = text[at..line_end].trim();
        if trimmed == "[[services]]" {
            starts.push(line_start);
        } else if !starts.is_empty()
            && !trimmed.starts_with("[services.")
            && !trimmed.starts_with("[[services.")
        {
            return None;
        }
    }
    let Some(&first) = starts.first() else {
        return Some((text, Vec::new()));
    };
    let ends = starts.iter().skip(1).copied().chain([text.len()]);
    let pieces = starts.iter().zip(ends).map(|(&a, b)| a..b).collect();
    Some((&text[..first], pieces))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn whole(text: &str) -> Result<Config, String> {
        toml::from_str::<Config>(text).map_err(|e| e.to_string())
    }

    /// Texts with a head, services with subtables, comments, odd spacing, and now and then
    /// something that must not be cut (a stray top-level table, a multi-line string, a
    /// syntax error).
    fn arb_text() -> impl Strategy<Value = String> {
        let backend = (0u16..4, 1u32..4);
        let extra = prop_oneof![
            6 => Just(""),
            1 => Just("[services.health]\ntype = \"tcp\"\n"),
            1 => Just("  # a comment\n"),
            1 => Just("[agent]\nresync = \"5s\"\n"),
            1 => Just("name = \"dup\"\n"),
            1 => Just("[services.affinity]\ntimeout = '''1h'''\n"),
            1 => Just("[[services.backends]]\naddr = \n"),
        ];
        let svc = (0u8..6, proptest::collection::vec(backend, 0..3), extra);
        let head = prop_oneof![
            Just(String::new()),
            Just("[agent]\nresync = \"2s\"\n".to_owned()),
            Just("[agent.limits]\nmax_slots = 1000\n".to_owned()),
            Just("[agent]\nbogus = 1\n".to_owned()),
        ];
        (head, proptest::collection::vec(svc, 0..6)).prop_map(|(head, services)| {
            let mut text = head;
            for (v, backends, extra) in services {
                text += &format!(
                    "\n[[services]]\nname = \"s{v}\"\nvip = \"127.100.0.{}:80\"\n",
                    v + 1
                );
                for (b, w) in backends {
                    text += &format!(
                        " [[services.backends]]\naddr = \"127.0.0.1:{}\"\nweight = {w}\n",
                        1000 + b
                    );
                }
                text += extra;
            }
            text
        })
    }

    proptest! {
        /// Re-reading any sequence of texts gives what parsing each whole gives.
        #[test]
        fn pieces_parse_like_the_whole_text(texts in proptest::collection::vec(arb_text(), 1..8)) {
            let mut reparser = Reparser::default();
            for text in &texts {
                let got = reparser.parse(text.clone(), "test").map_err(|e| e.to_string());
                let want = whole(text).and_then(|config| {
                    agent_only(&config.agent)
                        .validate("test")
                        .map(|()| config)
                        .map_err(|e| e.to_string())
                });
                match (&got, &want) {
                    (Ok(got), Ok(want)) => prop_assert_eq!(got, want),
                    (Err(_), Err(_)) => {}
                    _ => prop_assert!(false, "{text}\ngot {got:?}\nwant {want:?}"),
                }
            }
        }
    }

    /// A start parses its pieces on several threads: the same services in the same order, and
    /// one bad piece anywhere still fails the whole text (which is then parsed whole, for the
    /// error). Needs a machine with more than one CPU to take the parallel path.
    #[test]
    fn many_pieces_parse_on_threads_like_the_whole_text() {
        let count = 3 * PARALLEL_PARSE_MIN;
        let mut text = String::from("[agent]\nresync = \"2s\"\n");
        for i in 0..count {
            text += &format!(
                "[[services]]\nname = \"s{i}\"\nvip = \"127.100.{}.{}:80\"\n\
                 [[services.backends]]\naddr = \"127.0.0.1:{}\"\n",
                i / 250,
                i % 250 + 1,
                1024 + i
            );
        }
        let got = Reparser::default().parse(text.clone(), "test").unwrap();
        assert_eq!(got, whole(&text).unwrap());
        assert_eq!(got.services.len(), count);
        let bad = text.replace("name = \"s1000\"", "name = ");
        let mut reparser = Reparser::default();
        assert!(reparser.parse(bad, "test").is_err());
        assert!(reparser.pieces.is_empty(), "a failed parse keeps no pieces");
    }

    #[test]
    fn only_changed_pieces_are_parsed_again() {
        let mut reparser = Reparser::default();
        let text = "[[services]]\nname = \"a\"\nvip = \"127.100.0.1:80\"\n\
                    [[services]]\nname = \"b\"\nvip = \"127.100.0.2:80\"\n";
        let first = reparser.parse(text.to_owned(), "test").unwrap();
        assert_eq!(first.services.len(), 2);
        let edited = text.replace("\"b\"", "\"c\"");
        // The unchanged piece comes from the cache: mark it to see.
        reparser.pieces[0].1.name = "cached".into();
        let second = reparser.parse(edited.clone(), "test").unwrap();
        assert_eq!(second.services[0].name, "cached");
        assert_eq!(second.services[1].name, "c");
        // Moved pieces are found too.
        // A piece inserted at the front: the others are found counted from the end.
        let inserted = format!("[[services]]\nname = \"z\"\nvip = \"127.100.0.9:80\"\n{edited}");
        let third = reparser.parse(inserted, "test").unwrap();
        let names: Vec<&str> = third.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["z", "cached", "c"]);
    }

    #[test]
    fn a_table_after_the_services_is_not_cut() {
        let text =
            "[[services]]\nname = \"a\"\nvip = \"127.100.0.1:80\"\n[agent]\nresync = \"5s\"\n";
        assert!(cut(text).is_none());
        let config = Reparser::default().parse(text.to_owned(), "test").unwrap();
        assert_eq!(config.agent.resync, std::time::Duration::from_secs(5));
    }
}
