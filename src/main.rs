//! The `walletq` binary: the command line of the library ([`walletq::run_cli`]), nothing else.

fn main() -> std::process::ExitCode {
    walletq::run_cli()
}
