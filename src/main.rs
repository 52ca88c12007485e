fn main() -> std::process::ExitCode {
    walletq::cli::main()
}
