//! The Docker image of the demo backend, built on this machine, for tests that need a
//! container image and have no registry to pull one from.
//!
//! The image is `FROM scratch` and holds:
//! * `/plane-demo-backend` (mode 0755): `plane-demo-backend` from `crates/plane-demo`,
//!   linked statically (glibc with `+crt-static`), so it needs nothing else in the image;
//! * `/tmp` (mode 1777) and `/plane-data` (mode 0755), both empty;
//! * `ENTRYPOINT ["/plane-demo-backend"]`, `ENV PORT=8080`, `EXPOSE 8080`.
//!
//! Its reference is `plane-demo-backend:<tag>`, where the tag is the first 12 hex digits of
//! the SHA-256 of the binary, so an image is rebuilt exactly when the binary changes, and
//! several versions can sit side by side.
//!
//! ```no_run
//! plane_test_image::require_docker()?;
//! let image = plane_test_image::demo_image()?; // e.g. "plane-demo-backend:3f9a0c1d2e4b"
//! // docker run -d -p 127.0.0.1::8080 <image>, then GET /env, /debug/limits, …
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! # How it is built
//!
//! [`demo_image`] runs, in order:
//! 1. `$CARGO build --locked -p plane-demo --bin plane-demo-backend --target
//!    x86_64-unknown-linux-gnu` with `RUSTFLAGS="-C target-feature=+crt-static"` (with
//!    `--target`, the flags do not reach build scripts and proc-macros, which stay
//!    dynamic), in the `dev` profile, into its own target directory,
//!    `<target dir>/static-demo`. It must not be the target directory of the `cargo test`
//!    that runs the caller: that one holds the directory's lock while tests run, so a
//!    nested build there would wait forever. `<target dir>` is `CARGO_TARGET_DIR` if set
//!    (relative to the workspace root if relative), else the target directory the running
//!    executable was built in (the nearest ancestor holding Cargo's `CACHEDIR.TAG`, else
//!    the parent of the nearest `debug`/`release`), else `<workspace>/target`;
//! 2. checks that the binary is a static ELF (no `PT_INTERP` program header);
//! 3. if `docker image inspect` finds the reference, returns it; otherwise writes the tar
//!    of the image's filesystem to a temporary file and runs `docker import` with the
//!    `--change`s above.
//!
//! Callers are serialized by an in-process mutex and by an exclusive lock on
//! `<target dir>/static-demo/plane-test-image.lock`, since several test binaries may run
//! at once (nextest, or `cargo test` over several crates). The first call of a process
//! does the work (a cold build takes minutes; a warm one, a few seconds to check that
//! nothing changed); later calls of that process return the cached reference.
//!
//! Docker must be reachable through the `docker` command. The functions run commands and
//! block: from async code use [`demo_image_async`].
//!
//! # Pulling it from a registry
//!
//! [`registry::TestRegistry`] serves an image the engine has (this one, usually) from a
//! fake registry on loopback, with optional Basic authentication, so tests can exercise
//! real pulls (`docker pull`, credentials, progress) with no registry on the internet.

mod cli;
pub mod registry;

pub use cli::{docker, docker_ok, inspect, RemoveContainers, RemoveImage};

use anyhow::{bail, Context as _};
use sha2::{Digest as _, Sha256};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The repository part of the image reference.
pub const IMAGE_NAME: &str = "plane-demo-backend";
/// Where the binary is in the image (also its entrypoint).
pub const BINARY_IN_IMAGE: &str = "/plane-demo-backend";
/// The port the image's backend listens on (`ENV PORT=8080`, `EXPOSE 8080`).
pub const CONTAINER_PORT: u16 = 8080;
/// The target triple of the static build.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The package and binary built.
const PACKAGE: &str = "plane-demo";
const BINARY: &str = "plane-demo-backend";
/// The directory, under the main target directory, of the static build.
const STATIC_TARGET_DIR: &str = "static-demo";
/// The lock file, in that directory, that serializes builders across processes.
const LOCK_FILE: &str = "plane-test-image.lock";
/// How long `docker version` may take to answer.
const DOCKER_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// The image reference already built by this process.
static BUILT: Mutex<Option<String>> = Mutex::new(None);

/// Builds the demo backend image if needed and returns its reference,
/// `plane-demo-backend:<first 12 hex digits of the binary's SHA-256>`.
///
/// Blocking; see the crate docs for the steps. Errors say which step failed, with the
/// output of the failed command (cargo's compiler errors, docker's message).
pub fn demo_image() -> anyhow::Result<String> {
    let mut built = BUILT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(image) = &*built {
        return Ok(image.clone());
    }
    let image = build_image()?;
    *built = Some(image.clone());
    Ok(image)
}

/// [`demo_image`] on tokio's blocking pool, for async tests.
pub async fn demo_image_async() -> anyhow::Result<String> {
    tokio::task::spawn_blocking(demo_image)
        .await
        .context("the image build task panicked")?
}

/// For tests: checks the engine ([`require_docker`]) and returns the image, panicking
/// with the cause otherwise, so that a Docker test fails (never skips) without Docker.
pub async fn test_image() -> String {
    if let Err(err) = require_docker() {
        panic!("{err:#}");
    }
    match demo_image_async().await {
        Ok(image) => image,
        Err(err) => panic!("building the demo backend image: {err:#}"),
    }
}

/// Checks that a Docker engine answers through the `docker` command, and returns an error
/// that says so otherwise. Docker tests call it first, so that they fail (they do not
/// skip) with a clear reason on a machine without Docker.
pub fn require_docker() -> anyhow::Result<()> {
    let advice = "Docker tests need a running Docker engine, reached with the `docker` command \
                  (as for `docker version`); start it (e.g. `dockerd &`) or point DOCKER_HOST at one";
    let mut command = Command::new("docker");
    command.args(["version", "--format", "{{.Server.Version}}"]);
    let output = match output_within(&mut command, DOCKER_CHECK_TIMEOUT) {
        Ok(output) => output,
        Err(err) => bail!("{advice}: {err:#}"),
    };
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || version.is_empty() {
        bail!(
            "{advice}: `docker version` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Builds the binary, then the image unless it exists; under the cross-process lock.
fn build_image() -> anyhow::Result<String> {
    let workspace = workspace_root();
    let static_dir = main_target_dir(&workspace).join(STATIC_TARGET_DIR);
    std::fs::create_dir_all(&static_dir).with_context(|| format!("cannot create {}", static_dir.display()))?;
    let lock_path = static_dir.join(LOCK_FILE);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open the lock file {}", lock_path.display()))?;
    // Released when `lock` is dropped, on every return path.
    lock.lock()
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;

    let binary = build_static_binary(&workspace, &static_dir)?;
    let content = std::fs::read(&binary).with_context(|| format!("cannot read {}", binary.display()))?;
    if let Err(err) = check_static_elf(&content) {
        bail!("{} is not a static executable: {err}", binary.display());
    }
    let image = format!("{IMAGE_NAME}:{}", short_hash(&content));
    if !image_exists(&image)? {
        import_image(&content, &image, &static_dir)?;
    }
    Ok(image)
}

/// The workspace root: this crate is `<workspace>/crates/plane-test-image`.
fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// The target directory of the build that made the running executable (see the crate docs).
fn main_target_dir(workspace: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|dir| !dir.is_empty()) {
        return workspace.join(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| target_dir_of(&exe))
        .unwrap_or_else(|| workspace.join("target"))
}

/// The target directory `exe` was built in, if it looks like one.
fn target_dir_of(exe: &Path) -> Option<PathBuf> {
    // Cargo writes CACHEDIR.TAG at the root of every target directory it creates.
    if let Some(dir) = exe.ancestors().skip(1).find(|dir| dir.join("CACHEDIR.TAG").is_file()) {
        return Some(dir.to_owned());
    }
    exe.ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "debug" || name == "release"))
        .and_then(Path::parent)
        .map(Path::to_owned)
}

/// Runs the static `cargo build` and returns the path of the binary.
fn build_static_binary(workspace: &Path, static_dir: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .current_dir(workspace)
        .arg("build")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .args(["-p", PACKAGE, "--bin", BINARY, "--target", TARGET])
        .arg("--target-dir")
        .arg(static_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // Set by an outer cargo for build scripts, and it would win over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .stdin(Stdio::null());
    let output = command
        .output()
        .with_context(|| format!("cannot run {}", Path::new(&cargo).display()))?;
    if !output.status.success() {
        bail!(
            "the static build of {BINARY} failed ({}): {}\n{}{}",
            output.status,
            describe(&command),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
    let binary = static_dir.join(TARGET).join("debug").join(BINARY);
    if !binary.is_file() {
        bail!("the static build succeeded but {} is missing", binary.display());
    }
    Ok(binary)
}

/// Checks that `elf` is a 64-bit little-endian ELF executable with no `PT_INTERP`
/// program header: it names no dynamic loader, so it runs in an empty image. (A static
/// PIE still has `PT_DYNAMIC`, for its own relocations; that is fine.)
fn check_static_elf(elf: &[u8]) -> Result<(), String> {
    const PT_INTERP: u32 = 3;
    const ET_EXEC: u16 = 2;
    const ET_DYN: u16 = 3;
    let u16_at = |at: usize| elf.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| elf.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |at: usize| elf.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("not an ELF file".to_owned());
    }
    if elf.get(4..6) != Some([2, 1].as_slice()) {
        return Err("not a 64-bit little-endian ELF file".to_owned());
    }
    let kind = u16_at(16).ok_or("truncated ELF header")?;
    if kind != ET_EXEC && kind != ET_DYN {
        return Err(format!("ELF type {kind} is not an executable"));
    }
    let too_short = || "truncated ELF program headers".to_owned();
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(too_short)?).map_err(|_| too_short())?;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(too_short)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(too_short)?);
    if phnum == 0 || phentsize < 4 {
        return Err("no program headers".to_owned());
    }
    for i in 0..phnum {
        let at = phentsize
            .checked_mul(i)
            .and_then(|off| off.checked_add(phoff))
            .ok_or_else(too_short)?;
        if u32_at(at).ok_or_else(too_short)? == PT_INTERP {
            return Err("it has a PT_INTERP program header (it is dynamically linked)".to_owned());
        }
    }
    Ok(())
}

/// The first 12 hex digits of the SHA-256 of `content`.
fn short_hash(content: &[u8]) -> String {
    let digest = Sha256::digest(content);
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// True if the Docker engine has `image`.
fn image_exists(image: &str) -> anyhow::Result<bool> {
    let output = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .stdin(Stdio::null())
        .output()
        .context("cannot run `docker image inspect`")?;
    Ok(output.status.success())
}

/// Writes the image's filesystem as a tar to a temporary file, and `docker import`s it as
/// `image`.
fn import_image(binary: &[u8], image: &str, static_dir: &Path) -> anyhow::Result<()> {
    let archive = tempfile::Builder::new()
        .prefix("plane-demo-image-")
        .suffix(".tar")
        .tempfile_in(static_dir)
        .context("cannot create the image's tar file")?;
    write_rootfs_tar(archive.as_file(), binary).context("cannot write the image's tar file")?;
    let mut command = Command::new("docker");
    command
        .arg("import")
        .args(["--change", &format!(r#"ENTRYPOINT ["{BINARY_IN_IMAGE}"]"#)])
        .args(["--change", &format!("ENV PORT={CONTAINER_PORT}")])
        .args(["--change", &format!("EXPOSE {CONTAINER_PORT}")])
        .arg(archive.path())
        .arg(image)
        .stdin(Stdio::null());
    let output = command.output().context("cannot run `docker import`")?;
    if !output.status.success() {
        bail!(
            "`docker import` of {image} failed ({}): {}\n{}",
            output.status,
            describe(&command),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The image's filesystem: `/tmp` (1777), `/plane-data` (0755) and the binary (0755),
/// owned by root, with a fixed modification time so the same binary gives the same tar.
fn write_rootfs_tar(out: &File, binary: &[u8]) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(out);
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header
    };
    tar.append_data(
        &mut header(tar::EntryType::Directory, 0o1777, 0),
        "tmp/",
        std::io::empty(),
    )?;
    tar.append_data(
        &mut header(tar::EntryType::Directory, 0o755, 0),
        "plane-data/",
        std::io::empty(),
    )?;
    let name = BINARY_IN_IMAGE.trim_start_matches('/');
    tar.append_data(
        &mut header(tar::EntryType::Regular, 0o755, binary.len() as u64),
        name,
        binary,
    )?;
    tar.into_inner()?.sync_all()
}

/// Runs `command` with its output captured, killing it after `timeout`.
fn output_within(command: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", describe(command)))?;
    let deadline = Instant::now() + timeout;
    // The outputs expected here are small, so they fit in the pipes until the exit.
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} did not answer within {timeout:?}", describe(command));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut pipe) = child.stdout.take() {
        pipe.read_to_end(&mut stdout)?;
    }
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_end(&mut stderr)?;
    }
    Ok(Output { status, stdout, stderr })
}

/// `command` as a shell-like line, for error messages.
fn describe(command: &Command) -> String {
    let quote = |s: &OsStr| {
        let s = s.to_string_lossy();
        if s.contains([' ', '"', '\'']) {
            format!("'{s}'")
        } else {
            s.into_owned()
        }
    };
    std::iter::once(quote(command.get_program()))
        .chain(command.get_args().map(quote))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_checks() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // This test binary is linked dynamically (the normal build), so it names a loader.
        let err = check_static_elf(&exe).unwrap_err();
        assert!(err.contains("PT_INTERP"), "{err}");
        assert!(check_static_elf(b"#!/bin/sh\n").is_err());
        assert!(check_static_elf(&exe[..20]).is_err());
        // A minimal static ELF: a header and one PT_LOAD program header.
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[16..18].copy_from_slice(&2u16.to_le_bytes());
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(check_static_elf(&elf), Ok(()));
        elf[64..68].copy_from_slice(&3u32.to_le_bytes());
        assert!(check_static_elf(&elf).is_err());
    }

    #[test]
    fn target_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("tgt");
        let exe = target.join("x86_64-unknown-linux-gnu/debug/deps/t-123");
        std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
        // Without the tag: the parent of `debug`.
        assert_eq!(target_dir_of(&exe), Some(target.join("x86_64-unknown-linux-gnu")));
        std::fs::write(target.join("CACHEDIR.TAG"), "").unwrap();
        assert_eq!(target_dir_of(&exe), Some(target.clone()));
        assert_eq!(target_dir_of(Path::new("/nowhere/bin/t")), None);
        // The test binary itself was built in a real target directory.
        let main = main_target_dir(&workspace_root());
        assert!(
            main.join("CACHEDIR.TAG").is_file() || main.ends_with("target"),
            "{main:?}"
        );
    }

    #[test]
    fn tar_layout() {
        use std::io::Seek as _;
        let mut file = tempfile::tempfile().unwrap();
        write_rootfs_tar(&file, b"binary").unwrap();
        file.rewind().unwrap();
        let mut archive = tar::Archive::new(&file);
        let entries: Vec<_> = archive
            .entries()
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                let header = entry.header();
                (
                    entry.path().unwrap().to_string_lossy().into_owned(),
                    header.mode().unwrap(),
                    header.size().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("tmp/".to_owned(), 0o1777, 0),
                ("plane-data/".to_owned(), 0o755, 0),
                ("plane-demo-backend".to_owned(), 0o755, 6),
            ]
        );
    }

    #[test]
    fn hashes_and_descriptions() {
        assert_eq!(short_hash(b""), "e3b0c44298fc");
        let mut command = Command::new("docker");
        command.args(["--change", "ENV PORT=8080", "x"]);
        assert_eq!(describe(&command), "docker --change 'ENV PORT=8080' x");
    }
}
