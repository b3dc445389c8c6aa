//! The kernel programs' log records (aya-log) forwarded into the agent's log.

/// Reads the kernel programs' log records into the agent's log.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Polls the kernel programs' log ring buffer and writes its records to the agent's log.
pub fn forward_kernel_log(logger: KernelLogger) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the logger owns the ring buffer's fd, which stays open and the same for as long
    // as the AsyncFd (which owns the logger) lives.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|err| anyhow::anyhow!("polling the kernel log: {err}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut ready) = fd.readable_mut().await else {
                return;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }))
}
