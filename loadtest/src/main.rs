//! `fleetcall-loadtest`: see `fleetcall_loadtest::cli` and `--help`.

fn main() {
    std::process::exit(fleetcall_loadtest::cli::main());
}
