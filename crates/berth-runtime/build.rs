//! Compiles `berth-init` (crates/berth-init/src/main.rs, std only) into a static
//! executable for the target, which `machine_init` embeds: every Machine's PID 1, which
//! must run in any image, with or without a libc.

use std::env;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), String> {
    let var = |name: &str| env::var_os(name).ok_or_else(|| format!("{name} is not set"));
    let source = PathBuf::from(var("CARGO_MANIFEST_DIR")?).join("../berth-init/src/main.rs");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(var("OUT_DIR")?).join("berth-init");
    let mut command = Command::new(var("RUSTC")?);
    command
        .args([
            "--edition=2021",
            "--crate-name",
            "berth_init",
            "--crate-type",
            "bin",
        ])
        .arg("--target")
        .arg(var("TARGET")?)
        // Static (static-pie against glibc): no loader, no libc needed in the image.
        .args(["-C", "target-feature=+crt-static"])
        .args([
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "codegen-units=1",
        ])
        .args(["-C", "strip=symbols"])
        .arg("-o")
        .arg(&out)
        .arg(&source);
    // The linker cargo was told to use for this target, if any.
    if let Some(linker) = env::var_os("RUSTC_LINKER") {
        let mut flag = OsString::from("linker=");
        flag.push(linker);
        command.arg("-C").arg(flag);
    }
    let status = command
        .status()
        .map_err(|e| format!("run rustc for berth-init: {e}"))?;
    if !status.success() {
        return Err(format!("building the static berth-init failed: {status}"));
    }
    Ok(())
}
