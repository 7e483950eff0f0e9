use clap::Parser;

fn main() {
    let cli = offsite::cli::Cli::parse();
    offsite::cli::init_logging(cli.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(offsite::cli::run(cli)) {
        // `replicate --exec`: exit with the application's status.
        if let Some(s) = e.downcast_ref::<offsite::daemon::ExitStatus>() {
            std::process::exit(s.0);
        }
        // One line: the reason, with its causes joined.
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("offsite: error: {msg}");
        std::process::exit(1);
    }
}
