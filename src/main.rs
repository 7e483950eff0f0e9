use clap::Parser;

fn main() {
    offsite::engine::sqlite::configure_process();
    // glibc gives every thread that allocates its own arena; a thousand
    // databases' small, long-lived allocations spread over them cost 40% more
    // resident memory than two arenas do (measured, docs/BENCHMARKS-sidecar.md).
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt before any thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = offsite::cli::Cli::parse();
    offsite::cli::init_logging(cli.log_format);
    // Replicators run SQLite and file I/O through `block_in_place`, which
    // hands the worker's queue to a thread from the blocking pool. With a
    // thousand databases an unbounded pool grew to 512 threads (~170 MB of
    // stacks and malloc caches); a small pool serves them as well.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(16)
        .thread_keep_alive(std::time::Duration::from_secs(5))
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(offsite::cli::run(cli)) {
        // `replicate --exec`: exit with the application's status.
        if let Some(s) = e.downcast_ref::<offsite::ExitStatus>() {
            std::process::exit(s.0);
        }
        // One line: the reason, with its causes joined.
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("offsite: error: {msg}");
        std::process::exit(1);
    }
}
