//! The container image's binary, built the way the Dockerfile builds it.
//!
//! There is no Docker engine on the build machines, so this test proves the image recipe
//! instead: a release build for `x86_64-unknown-linux-musl` with `musl-gcc` compiling the C
//! parts of the crypto crates, checked to be fully static by reading its ELF headers (no
//! program interpreter, no needed shared libraries: exactly what a `scratch` image can run),
//! then run: `--version` and `check-config` on the shipped sidecar.toml.
//!
//! Needs Debian's musl-tools and `rustup target add x86_64-unknown-linux-musl`. The build
//! goes to target/musl, so it never waits on the lock of the main target directory. A cold
//! build takes a few minutes on two cores.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TARGET: &str = "x86_64-unknown-linux-musl";

/// The build as the Dockerfile's builder stage runs it; `dockerfile_builds_the_same_way`
/// keeps the two in step.
const CARGO_ARGS: [&str; 5] = ["build", "--release", "--locked", "--target", TARGET];
const BUILD_ENV: [(&str, &str); 2] = [
    ("CC_x86_64_unknown_linux_musl", "musl-gcc"),
    ("CARGO_PROFILE_RELEASE_STRIP", "symbols"),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Builds the musl binary and returns its path.
fn build_static_binary() -> PathBuf {
    let musl_gcc = run(Command::new("musl-gcc").arg("--version"));
    assert!(
        musl_gcc.status.success(),
        "musl-gcc does not run: install Debian's musl-tools (.ci/run does)"
    );
    let target_dir = repo().join("target").join("musl");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(CARGO_ARGS)
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", &target_dir)
        .envs(BUILD_ENV)
        // The Dockerfile sets no flags; an outer `cargo test` or coverage run might.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    let output = run(&mut cmd);
    assert!(
        output.status.success(),
        "{cmd:?} failed (is the target installed? `rustup target add {TARGET}`):\n{}",
        text(&output.stderr)
    );
    let binary = target_dir
        .join(TARGET)
        .join("release")
        .join("sprint-sidecar");
    assert!(binary.is_file(), "{} was not built", binary.display());
    binary
}

/// What the ELF headers say about linking.
#[derive(Debug)]
struct Linking {
    interpreter: Option<String>,
    needed_libraries: usize,
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads the program headers of a little-endian ELF64 x86-64 executable: PT_INTERP names the
/// dynamic loader a dynamically linked program needs; PT_DYNAMIC's DT_NEEDED entries name its
/// shared libraries. A static (or static-pie) binary has neither.
fn linking_of(path: &Path) -> Linking {
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    const EM_X86_64: u16 = 62;
    const ET_EXEC: u16 = 2;
    const ET_DYN: u16 = 3;

    let bytes = std::fs::read(path).expect("the binary is readable");
    assert!(
        bytes.len() > 64 && bytes[..4] == *b"\x7fELF",
        "not an ELF file"
    );
    assert_eq!(bytes[4], 2, "not ELF64");
    assert_eq!(bytes[5], 1, "not little-endian");
    let kind = u16_at(&bytes, 0x10);
    assert!(
        kind == ET_EXEC || kind == ET_DYN,
        "not an executable (e_type {kind})"
    );
    assert_eq!(u16_at(&bytes, 0x12), EM_X86_64, "not x86-64");

    let program_headers = u64_at(&bytes, 0x20) as usize;
    let entry_size = u16_at(&bytes, 0x36) as usize;
    let count = u16_at(&bytes, 0x38) as usize;
    let mut linking = Linking {
        interpreter: None,
        needed_libraries: 0,
    };
    for index in 0..count {
        let header = program_headers + index * entry_size;
        let offset = u64_at(&bytes, header + 8) as usize;
        let file_size = u64_at(&bytes, header + 32) as usize;
        let segment = &bytes[offset..offset + file_size];
        match u32_at(&bytes, header) {
            PT_INTERP => {
                let name = segment.split(|b| *b == 0).next().unwrap_or_default();
                linking.interpreter = Some(text(name));
            }
            PT_DYNAMIC => {
                for entry in segment.chunks_exact(16) {
                    match u64_at(entry, 0) {
                        DT_NULL => break,
                        DT_NEEDED => linking.needed_libraries += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    linking
}

#[test]
fn musl_release_binary_is_static_and_runs() {
    let binary = build_static_binary();

    let linking = linking_of(&binary);
    assert!(
        linking.interpreter.is_none() && linking.needed_libraries == 0,
        "{} is dynamically linked ({linking:?}); a scratch image cannot run it",
        binary.display()
    );

    let version = run(Command::new(&binary).arg("--version"));
    assert!(
        version.status.success(),
        "--version failed: {}",
        text(&version.stderr)
    );
    let printed = text(&version.stdout);
    assert!(
        printed.contains(env!("CARGO_PKG_VERSION")),
        "--version printed {printed:?}"
    );

    // The image's CMD: the shipped sidecar.toml must be a valid configuration.
    let mut check = Command::new(&binary);
    check
        .arg("check-config")
        .arg("--config")
        .arg(repo().join("sidecar.toml"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SPRINT_SIDECAR_") {
            check.env_remove(key);
        }
    }
    let output = run(&mut check);
    assert!(
        output.status.success(),
        "check-config --config sidecar.toml failed:\n{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

#[test]
fn dockerfile_builds_the_same_way() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let command = format!("cargo {}", CARGO_ARGS.join(" "));
    assert!(
        dockerfile.matches(&command).count() >= 2,
        "the Dockerfile no longer runs `{command}` (dependency layer and crate layer); \
         update this test and the Dockerfile together"
    );
    for (key, value) in BUILD_ENV {
        assert!(
            dockerfile.contains(&format!("{key}={value}")),
            "the Dockerfile no longer sets {key}={value}"
        );
    }
    assert!(
        dockerfile.contains(&format!("rustup target add {TARGET}"))
            && dockerfile.contains("musl-tools"),
        "the builder stage must install the musl target and musl-tools"
    );
    // Cargo.toml patches h2 from vendor/: the dependency layer needs it before it builds.
    let vendor = dockerfile.find("COPY vendor ./vendor");
    let first_build = dockerfile.find(&command);
    assert!(
        matches!((vendor, first_build), (Some(v), Some(b)) if v < b),
        "the Dockerfile must copy vendor/ (the patched h2) before the dependency build"
    );
    let release_path = format!("target/{TARGET}/release/sprint-sidecar");
    assert!(
        dockerfile.contains(&release_path),
        "the image must copy {release_path}"
    );
}
