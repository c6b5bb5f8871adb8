//! Builds the eBPF programs (`ebpf/steer-ebpf`, nightly + bpf-linker) so the agent can embed the
//! object and `steer` stays one self-contained binary. `cargo xtask setup` installs the toolchain.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = format!("{manifest_dir}/../ebpf/steer-ebpf");
    println!("cargo:rerun-if-changed={manifest_dir}/../ebpf/steer-common");
    let package = aya_build::Package {
        name: "steer-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
