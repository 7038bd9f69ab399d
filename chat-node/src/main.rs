//! `chat-node` binary: parse the flags, run the node until SIGTERM or SIGINT (see the
//! library docs). A first signal stops accepting and lets in-flight turns finish (for at
//! most the Redis retry budget + LLM timeout + 5 s); a second one exits at once.

use chat_node::config::{Args, Config};
use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let config = match Config::try_from(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chat-node: {e}\nTry 'chat-node --help'.");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chat-node: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let grace =
        config.redis_retry + config.llm.as_ref().map(|l| l.timeout).unwrap_or_default() + Duration::from_secs(5);
    let node_id = config.node_id.clone();
    match runtime.block_on(chat_node::run(config, signals(node_id, grace))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-node: {e}");
            ExitCode::from(1)
        }
    }
}

/// Completes on the first SIGTERM/SIGINT; then a second signal, or `grace` passing,
/// ends the process.
async fn signals(node_id: String, grace: Duration) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        eprintln!("chat-node {node_id}: cannot install signal handlers; stop it with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("chat-node {node_id}: shutting down: no new connections, finishing in-flight requests");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => eprintln!("chat-node {node_id}: second signal: exiting now"),
            _ = int.recv() => eprintln!("chat-node {node_id}: second signal: exiting now"),
            _ = tokio::time::sleep(grace) => eprintln!("chat-node {node_id}: in-flight requests still running after {grace:?}: exiting"),
        }
        std::process::exit(1);
    });
}
