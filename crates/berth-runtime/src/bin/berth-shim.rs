//! The runtime's helper programs (the runc shim, the native spawner, the exec helpers);
//! see `berth_runtime::shim`.

fn main() {
    let code = berth_runtime::shim::main_with_args(std::env::args_os().skip(1).collect());
    std::process::exit(code);
}
