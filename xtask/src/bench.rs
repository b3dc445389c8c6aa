//! `cargo xtask bench`: not implemented yet.

pub fn run(quick: bool) -> anyhow::Result<()> {
    let _ = quick;
    println!("bench: not implemented yet");
    std::process::exit(1);
}
