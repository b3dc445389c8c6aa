//! The config file as a registry source: loaded at start, watched for edits (also when it is
//! replaced by a rename), re-read on SIGHUP.

use std::path::Path;

use anyhow::Context as _;

/// Calls `changed` when `path` may have changed. Watches the directory, because editors and
/// config management replace files by renaming a new one over them. `changed(true)`: the file
/// was renamed into place, so it is complete; otherwise a writer may still be writing it.
pub fn watch(
    path: &Path,
    changed: impl Fn(bool) + Send + 'static,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let path = std::path::absolute(path)?;
    let dir = path
        .parent()
        .context("config file has no parent directory")?
        .to_path_buf();
    let name = path.file_name().map(ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let is_ours = |p: &std::path::PathBuf| p.file_name().map(ToOwned::to_owned) == name;
        if !event.paths.iter().any(is_ours) {
            return;
        }
        use notify::event::{EventKind, ModifyKind, RenameMode};
        let renamed_into_place = match event.kind {
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => true,
            // inotify reports a rename as From, To and then Both: To already stood for it, and
            // a second read would report a rejected edit twice.
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => return,
            _ => false,
        };
        changed(renamed_into_place);
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
