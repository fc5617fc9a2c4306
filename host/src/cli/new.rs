//! `tether new`: a crate for an agent of one's own, that builds with plain
//! `cargo build --release` (its target and profile are in the crate) and runs with
//! `tether run` in its directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// `tether new`'s arguments.
#[derive(clap::Args)]
pub struct NewArgs {
    /// The crate's directory and name: lower-case letters, digits and `-`, starting with
    /// a letter (it becomes the agent id too).
    name: String,
    /// What the agent starts as.
    #[arg(long, value_enum, default_value_t = Template::Http)]
    template: Template,
    /// The `guest-sdk` directory of a Tether checkout (default: the one this `tether`
    /// was built from, or $TETHER_SDK).
    #[arg(long, value_name = "DIR")]
    sdk: Option<PathBuf>,
}

/// The starting points.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Template {
    /// Log lines and a timer.
    Hello,
    /// Answers at its URL and counts in its store.
    Http,
    /// A board on a serial line: readings, and its LED over HTTP.
    Device,
    /// Azure IoT Hub (or `tether hub`): telemetry, twin, a direct method.
    Azure,
}

impl Template {
    /// The agent's source and its test (run natively by `tether test` with tether-testkit).
    fn sources(self) -> (&'static str, &'static str) {
        match self {
            Template::Hello => (include_str!("templates/hello.rs"), include_str!("templates/tests/hello.rs")),
            Template::Http => (include_str!("templates/http.rs"), include_str!("templates/tests/http.rs")),
            Template::Device => (include_str!("templates/device.rs"), include_str!("templates/tests/device.rs")),
            Template::Azure => (include_str!("templates/azure.rs"), include_str!("templates/tests/azure.rs")),
        }
    }

    /// The agent's section of tether.toml.
    fn run_config(self, name: &str) -> String {
        let mut text = format!("# Read by `tether run` in this directory (README: \"Running agents\").\n[agent]\nid = \"{name}\"\n");
        match self {
            Template::Hello | Template::Http => {}
            Template::Device => text += &format!(
                "\n# The board: a serial port, or the link `device-sim --link /tmp/tty{name}` keeps.\n[agent.device]\npath = \"/tmp/tty{name}\"\nbaud = 115200\n"
            ),
            Template::Azure => text += "\n[agent.config]\n# A device connection string: `tether hub` (run in this directory) prints one.\nconnection_string = \"\"\n\n[host]\n# The CA of `tether hub` run in this directory; for Azure itself, none is needed.\ntrusted_ca_files = [\"tether-data/hub/ca.pem\"]\n",
        }
        text
    }
}

/// Writes the crate.
pub fn new(args: &NewArgs) -> anyhow::Result<()> {
    let name = args.name.as_str();
    check_name(name)?;
    let sdk = sdk_dir(args.sdk.as_deref())?;
    let dir = Path::new(name);
    if dir.exists() {
        bail!("{} exists already; pick another name or remove it", dir.display());
    }
    let (source, test) = args.template.sources();
    let files = [
        ("Cargo.toml", cargo_toml(name, &sdk)),
        (".cargo/config.toml", "# Agents are WebAssembly components.\n[build]\ntarget = \"wasm32-wasip2\"\n".to_owned()),
        ("src/lib.rs", source.replace("{name}", name)),
        ("tests/agent.rs", test.replace("{name}", name)),
        ("tether.toml", args.template.run_config(name)),
        (".gitignore", "/target\ntether-data/\n".to_owned()),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("Created {name}/ (the SDK at {}).\nNext: `tether run {name}` builds it and runs it; `tether test {name}` runs its tests.", sdk.display());
    Ok(())
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.len() <= 64;
    if !ok {
        bail!("{name:?} is not a usable name: lower-case letters, digits and '-', starting with a letter, at most 64");
    }
    Ok(())
}

/// The SDK to depend on: `--sdk`, $TETHER_SDK, or the checkout this binary came from.
fn sdk_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk");
    let dir = match (given, std::env::var_os("TETHER_SDK")) {
        (Some(dir), _) => dir.to_owned(),
        (None, Some(dir)) => PathBuf::from(dir),
        (None, None) => built_from,
    };
    let dir = dir.canonicalize().with_context(|| format!("no Tether SDK at {}; pass --sdk DIR (the guest-sdk directory of a Tether checkout)", dir.display()))?;
    if !dir.join("wit/world.wit").is_file() {
        bail!("{} is not the Tether guest SDK (no wit/world.wit); pass --sdk DIR", dir.display());
    }
    if !dir.join("../testkit/Cargo.toml").is_file() {
        bail!("no testkit/ beside {}: pass --sdk DIR with the guest-sdk of a whole Tether checkout", dir.display());
    }
    Ok(dir)
}

fn cargo_toml(name: &str, sdk: &Path) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

# An agent is a WebAssembly component (the target is set in .cargo/config.toml).
[lib]
crate-type = ["cdylib"]

[dependencies]
tether-guest = {{ path = "{sdk}" }}
serde_json = "1"

# The tests (tests/), built for this machine by `tether test`.
[dev-dependencies]
tether-testkit = {{ path = "{sdk}/../testkit" }}
tokio = {{ version = "1", features = ["macros", "rt"] }}
anyhow = "1"

# Small, quick to load: what the Tether repository's `guest` profile does.
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true

# A workspace of its own, also when created inside another one.
[workspace]
"#,
        sdk = sdk.display()
    )
}
