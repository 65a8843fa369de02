//! Link options for the `paywatch` binary (nothing is generated).
//!
//! On Linux with glibc the binary is linked with packed relative relocations
//! (`-z pack-relative-relocs`, DT_RELR): a position-independent executable has one relocation per
//! pointer in its read-only data (about 45,000 here, 1 MiB as classic RELA entries), and the
//! dynamic loader reads all of them at every start, so they stayed resident in the daemon for
//! its whole life (about 1 MiB of its idle RSS). Packed, they take a few
//! kilobytes. It needs GNU ld 2.38 or lld 15 to link, and glibc 2.36 to run (Debian 12,
//! Ubuntu 22.10 and later).

// A build script speaks to cargo on stdout.
#![allow(clippy::print_stdout)]

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
