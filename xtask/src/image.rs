//! `cargo xtask image`: the agent's container image, built from
//! deploy/Dockerfile and checked.
//!
//! The development machines have no Docker engine, so where `docker info`
//! fails the image is built by buildah, which builds the same Dockerfile
//! without a daemon. Docker Hub may be unreachable from them as well: when
//! the Dockerfile's base, debian:bookworm-slim, is neither in the local
//! container storage nor pullable, a stand-in for it is debootstrapped from
//! Debian's own mirror, shaped like the official image (deb822 sources,
//! docker-clean, no apt lists or caches) and imported under its name.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use xtask::{prerequisites, run_checked, workspace_root};

/// The Dockerfile, relative to the workspace root, which is the build
/// context (deploy/Dockerfile.dockerignore keeps target/ and .git out).
const DOCKERFILE: &str = "deploy/Dockerfile";

/// The image both of the Dockerfile's stages start from.
const BASE: &str = "docker.io/library/debian:bookworm-slim";

/// What the stand-in for BASE is debootstrapped from.
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The official image's config, given to the stand-in on import.
const BASE_CONFIG: &[&str] = &[
    r#"CMD ["bash"]"#,
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
];

/// The official image's /etc/apt/sources.list.d/debian.sources.
const DEBIAN_SOURCES: &str = "\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

/// The official image's /etc/apt/apt.conf.d/docker-clean: apt keeps no
/// packages or caches in the layers of the images built on it.
const DOCKER_CLEAN: &str = r#"DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };

Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"#;

/// Local CAs of a machine whose HTTPS goes through a proxy. Mounted into
/// the build, they let the builder stage's ca-certificates trust that proxy
/// for rustup and cargo; the runtime stage has no ca-certificates, so
/// nothing of them lands in the image.
const LOCAL_CA: &str = "/usr/local/share/ca-certificates";

/// The agent in the image.
const AGENT: &str = "/usr/local/bin/proxy-userspace";

/// Commands the agent runs, which the image must have.
const IMAGE_COMMANDS: &[&str] = &["iptables-legacy-save", "iptables-nft-save", "nft"];

/// What the build with buildah needs, and its Debian packages.
const BUILDAH_TOOLS: &[(&str, &str)] = &[
    ("buildah", "buildah"),
    ("podman", "podman"),
    ("crun", "crun"),
    ("fuse-overlayfs", "fuse-overlayfs"),
];

#[derive(Clone, Copy)]
enum Engine {
    Docker,
    Buildah,
}

/// Builds `tag` from deploy/Dockerfile, then checks that its agent runs and
/// that it has the commands the agent needs.
pub fn build(tag: &str) -> Result<()> {
    let started = Instant::now();
    let workspace = workspace_root();
    let engine = if docker_engine() {
        eprintln!("building {tag} with the Docker engine");
        run_shown(
            Command::new("docker")
                .args(["build", "-f", DOCKERFILE, "-t", tag, "."])
                .current_dir(&workspace),
        )?;
        Engine::Docker
    } else {
        eprintln!("no Docker engine (`docker info` fails): building {tag} with buildah");
        ensure_buildah()?;
        ensure_base(&workspace.join("target/image"))?;
        build_with_buildah(&workspace, tag)?;
        Engine::Buildah
    };

    let image = Image::new(engine, tag)?;
    let version = image.run(&[AGENT, "--version"])?;
    let version = version.trim();
    if version.is_empty() {
        bail!("`{AGENT} --version` in {tag} printed nothing");
    }
    println!("{AGENT} --version: {version}");
    let script = format!(
        "for c in {}; do command -v \"$c\" || true; done",
        IMAGE_COMMANDS.join(" ")
    );
    let found = image.run(&["sh", "-c", &script])?;
    let missing = missing_commands(&found);
    if !missing.is_empty() {
        bail!(
            "{tag} lacks {}: the runtime stage of {DOCKERFILE} should install them \
             (packages iptables and nftables)",
            missing.join(", ")
        );
    }
    println!(
        "in the image: {}",
        found.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let megabytes = (image.size()? + 500_000) / 1_000_000;
    drop(image);
    let seconds = started.elapsed().as_secs();
    println!(
        "{tag}: {megabytes} MB (built and checked in {}m {:02}s)",
        seconds / 60,
        seconds % 60
    );
    Ok(())
}

/// Whether a Docker engine answers.
fn docker_engine() -> bool {
    let mut info = Command::new("docker");
    info.arg("info").stdout(Stdio::null()).stderr(Stdio::null());
    show(&info);
    info.status().is_ok_and(|status| status.success())
}

fn ensure_buildah() -> Result<()> {
    let missing: Vec<&str> = BUILDAH_TOOLS
        .iter()
        .filter(|(tool, _)| prerequisites::which(tool).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    prerequisites::apt_install(&missing)
}

/// Makes sure BASE is in the local container storage: already there,
/// pulled, or else a stand-in built in `work_dir`.
fn ensure_base(work_dir: &Path) -> Result<()> {
    let mut exists = Command::new("podman");
    exists.args(["image", "exists", BASE]);
    show(&exists);
    if exists.status().is_ok_and(|status| status.success()) {
        return Ok(());
    }
    // buildah says why when it cannot pull.
    if run_shown(Command::new("buildah").args(["pull", BASE])).is_ok() {
        return Ok(());
    }
    eprintln!("{BASE} cannot be pulled: building a stand-in with debootstrap");
    stand_in_base(work_dir)
}

/// Debootstraps a minimal bookworm into `work_dir`, shapes it like the
/// official slim image and imports it as BASE.
fn stand_in_base(work_dir: &Path) -> Result<()> {
    if prerequisites::which("debootstrap").is_none() || !Path::new(DEBIAN_KEYRING).exists() {
        prerequisites::apt_install(&["debootstrap", "debian-archive-keyring"])?;
    }
    let rootfs = work_dir.join("rootfs");
    let tarball = work_dir.join("base.tar");
    // A rootfs left by an interrupted run would make debootstrap fail.
    remove_rootfs(&rootfs)?;
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("cannot create {}", work_dir.display()))?;
    run_shown(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(SUITE)
            .arg(&rootfs)
            .arg(MIRROR),
    )?;
    shape_like_official_image(&rootfs)?;
    run_shown(
        Command::new("tar")
            .arg("--numeric-owner")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tarball)
            .arg("."),
    )?;
    remove_rootfs(&rootfs)?;
    let mut import = Command::new("podman");
    import.arg("import");
    for change in BASE_CONFIG {
        import.args(["--change", change]);
    }
    run_shown(import.arg(&tarball).arg(BASE))?;
    eprintln!("+ rm {}", tarball.display());
    std::fs::remove_file(&tarball).with_context(|| format!("cannot remove {}", tarball.display()))
}

/// What debuerreotype does to the official image that matters to the
/// Dockerfile: its deb822 sources, docker-clean, and no apt lists, package
/// caches, logs, temporary files or resolver config of the machine that
/// built it.
fn shape_like_official_image(rootfs: &Path) -> Result<()> {
    eprintln!(
        "shaping {} like the official image: deb822 sources, docker-clean; \
         no apt lists, caches, logs, /tmp or resolv.conf",
        rootfs.display()
    );
    let apt = rootfs.join("etc/apt");
    remove_file_if_exists(&apt.join("sources.list"))?;
    write_file(&apt.join("sources.list.d/debian.sources"), DEBIAN_SOURCES)?;
    write_file(&apt.join("apt.conf.d/docker-clean"), DOCKER_CLEAN)?;
    remove_entries(&rootfs.join("var/lib/apt/lists"), None)?;
    remove_entries(&rootfs.join("var/cache/apt/archives"), Some("deb"))?;
    remove_entries(&rootfs.join("var/cache/apt"), Some("bin"))?;
    remove_entries(&rootfs.join("var/log"), Some("log"))?;
    remove_entries(&rootfs.join("tmp"), None)?;
    let resolv = rootfs.join("etc/resolv.conf");
    remove_file_if_exists(&resolv)?;
    write_file(&resolv, "")
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

fn remove_file_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Removes the entries of `dir`, or those with this extension, as
/// `rm -rf dir/*` or `rm -f dir/*.extension` would.
fn remove_entries(dir: &Path, extension: Option<&str>) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        let path = entry.path();
        if extension.is_some_and(|e| path.extension() != Some(e.as_ref())) {
            continue;
        }
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(())
}

/// Removes a debootstrapped rootfs, unless something (an interrupted
/// debootstrap's /proc) is still mounted in it.
fn remove_rootfs(rootfs: &Path) -> Result<()> {
    if !rootfs.exists() {
        return Ok(());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    if let Some(mount) = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .find(|mount_point| Path::new(mount_point).starts_with(rootfs))
    {
        bail!("{mount} is still mounted (an interrupted debootstrap?): umount it, then run again");
    }
    eprintln!("+ rm -rf {}", rootfs.display());
    std::fs::remove_dir_all(rootfs).with_context(|| format!("cannot remove {}", rootfs.display()))
}

fn build_with_buildah(workspace: &Path, tag: &str) -> Result<()> {
    let mut bud = Command::new("buildah");
    // --layers caches every step, as docker build does. Chroot isolation
    // and the host's network need no OCI runtime and no container network,
    // which a development machine that is itself a container may not allow.
    bud.args([
        "bud",
        "--layers",
        "--isolation",
        "chroot",
        "--network",
        "host",
    ]);
    if has_certificates(Path::new(LOCAL_CA)) {
        bud.arg("-v").arg(format!("{LOCAL_CA}:{LOCAL_CA}:ro"));
    }
    run_shown(
        bud.args(["-f", DOCKERFILE, "-t", tag, "."])
            .current_dir(workspace),
    )
}

/// Whether `dir` holds a `*.crt`, where update-ca-certificates looks.
fn has_certificates(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|entry| {
            let path = entry.path();
            if path.is_dir() {
                has_certificates(&path)
            } else {
                path.extension().is_some_and(|e| e == "crt")
            }
        })
    })
}

/// The image being checked, run by its engine: by Docker one container a
/// command; by buildah in one working container, removed on drop.
enum Image<'a> {
    Docker { tag: &'a str },
    Buildah { tag: &'a str, container: String },
}

impl<'a> Image<'a> {
    fn new(engine: Engine, tag: &'a str) -> Result<Self> {
        Ok(match engine {
            Engine::Docker => Image::Docker { tag },
            Engine::Buildah => {
                let container = output_shown(Command::new("buildah").args(["from", tag]))?
                    .trim()
                    .to_owned();
                Image::Buildah { tag, container }
            }
        })
    }

    /// Runs `command` in the image and returns what it wrote to stdout.
    fn run(&self, command: &[&str]) -> Result<String> {
        let mut cmd = match self {
            // podman run fails in a sandbox that denies crun its setrlimit;
            // buildah run with chroot isolation needs no OCI runtime.
            Image::Buildah { container, .. } => {
                let mut cmd = Command::new("buildah");
                cmd.args(["run", "--isolation", "chroot", container, "--"]);
                cmd.args(command);
                cmd
            }
            Image::Docker { tag } => {
                let mut cmd = Command::new("docker");
                cmd.args(["run", "--rm", "--entrypoint", command[0], tag]);
                cmd.args(&command[1..]);
                cmd
            }
        };
        output_shown(&mut cmd)
    }

    /// The image's size in bytes.
    fn size(&self) -> Result<u64> {
        let (engine, tag) = match self {
            Image::Docker { tag } => ("docker", tag),
            Image::Buildah { tag, .. } => ("podman", tag),
        };
        let size = output_shown(Command::new(engine).args([
            "image",
            "inspect",
            "--format",
            "{{.Size}}",
            tag,
        ]))?;
        size.trim()
            .parse()
            .with_context(|| format!("{engine} image inspect gave the size {size:?}"))
    }
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        if let Image::Buildah { container, .. } = self {
            let mut rm = Command::new("buildah");
            rm.args(["rm", container]).stdout(Stdio::null());
            show(&rm);
            if let Err(error) = run_checked(&mut rm) {
                eprintln!("{error:#}");
            }
        }
    }
}

/// The IMAGE_COMMANDS missing from `found`, the paths `command -v` printed.
fn missing_commands(found: &str) -> Vec<&'static str> {
    IMAGE_COMMANDS
        .iter()
        .copied()
        .filter(|command| {
            !found
                .lines()
                .any(|path| Path::new(path.trim()).file_name() == Some(command.as_ref()))
        })
        .collect()
}

/// Prints `cmd` as a shell would read it, before it runs.
fn show(cmd: &Command) {
    eprintln!("+ {}", shell_words(cmd));
}

fn run_shown(cmd: &mut Command) -> Result<()> {
    show(cmd);
    run_checked(cmd)
}

/// Runs `cmd`, its stderr passed through, and returns its stdout.
fn output_shown(cmd: &mut Command) -> Result<String> {
    show(cmd);
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cmd`'s environment, program and arguments, quoted where a shell needs it.
fn shell_words(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(name, value)| {
        Some(format!(
            "{}={}",
            name.to_string_lossy(),
            quote(&value?.to_string_lossy())
        ))
    });
    let words = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|word| quote(&word.to_string_lossy()));
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

fn quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_shown_as_a_shell_reads_them() {
        let mut cmd = Command::new("podman");
        cmd.args(["import", "--change", r#"CMD ["bash"]"#, "it's"])
            .env("A", "b c");
        assert_eq!(
            shell_words(&cmd),
            r#"A='b c' podman import --change 'CMD ["bash"]' 'it'\''s'"#
        );
    }

    #[test]
    fn missing_commands_are_those_command_v_did_not_print() {
        assert_eq!(
            missing_commands("/usr/sbin/iptables-legacy-save\n/usr/sbin/nft\n"),
            ["iptables-nft-save"]
        );
        assert!(
            missing_commands(
                "/usr/sbin/iptables-legacy-save\n/usr/sbin/iptables-nft-save\n/usr/sbin/nft\n"
            )
            .is_empty()
        );
    }
}
