//! The `walletq` binary: the command line of [`walletq::cli`], nothing else.

fn main() -> std::process::ExitCode {
    walletq::cli::main()
}
