//! Options from a TOML config file (`--config FILE`), between environment variables
//! and defaults.
//!
//! Precedence, highest first: command-line flags, environment variables (`FARPOOL_*`,
//! handled by clap), the config file, built-in defaults. The file has one table per
//! subcommand that takes `--config` (`[controller]`, `[memnode]`, ...), so one file can
//! describe a whole deployment; each key is the long option name, in `snake_case` or
//! `kebab-case`, and each value a string, number or boolean (`true` turns a flag on):
//!
//! ```toml
//! [controller]
//! listen = "0.0.0.0:7070"
//! data_dir = "/var/lib/farpool"
//! lease_secs = 30
//!
//! [memnode]
//! controller = "10.0.0.1:7070"
//! capacity = "64GiB"
//! no_lock = true
//! ```
//!
//! Every table and key of the file is checked against the subcommands (an unknown
//! table, key or a bad value is an error naming the file, table and key), not only the
//! one being run, so a typo anywhere shows up at once. Values go through the same
//! parsers as the flags. Values from the file are applied by adding them as
//! command-line arguments for options whose value came from no flag and no
//! environment variable, so everything downstream sees one source of truth.

use clap::parser::ValueSource;
use clap::{ArgMatches, Command};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The id of the option naming the config file.
pub const CONFIG_ARG: &str = "config";

/// What is wrong with a config file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file '{}': {source}; check the path given to --config or FARPOOL_CONFIG", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The file-system error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file '{}' is not valid TOML: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A top-level table names no subcommand that takes a config file.
    #[error("config file '{}': unknown table [{table}]; use one of: {known}", path.display())]
    UnknownTable {
        /// The file.
        path: PathBuf,
        /// The table.
        table: String,
        /// The tables this build understands.
        known: String,
    },
    /// A value outside any table.
    #[error("config file '{}': '{key}' must be inside a table such as [controller] or [memnode]", path.display())]
    NotInTable {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A key names no option of its table's subcommand.
    #[error("config file '{}': unknown key '{key}' in [{table}]; known keys: {known}", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The table.
        table: String,
        /// The key.
        key: String,
        /// The keys the table accepts.
        known: String,
    },
    /// A value the option does not accept.
    #[error("config file '{}': bad value for '{key}' in [{table}]: {message}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The table.
        table: String,
        /// The key.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

/// Whether an argument can be set from a file: visible options other than `--config`,
/// `--help` and `--version`.
fn configurable(arg: &clap::Arg) -> bool {
    let id = arg.get_id().as_str();
    !arg.is_hide_set() && arg.get_long().is_some() && !matches!(id, CONFIG_ARG | "help" | "version")
}

/// The subcommands of `cmd` that take `--config`.
fn configurable_subcommands(cmd: &Command) -> Vec<&Command> {
    cmd.get_subcommands()
        .filter(|s| s.get_arguments().any(|a| a.get_id() == CONFIG_ARG))
        .collect()
}

/// One option set by the file, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    /// The argument id.
    id: String,
    /// The command-line arguments that set it (`--long=value` or `--flag`; empty for a
    /// flag set to false).
    args: Vec<OsString>,
}

/// Reads and checks `path` against every configurable subcommand of `cmd`; returns the
/// settings of `subcommand`.
fn load(cmd: &Command, subcommand: &str, path: &Path) -> Result<Vec<Setting>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(cmd, subcommand, path, &text)
}

fn parse(
    cmd: &Command,
    subcommand: &str,
    path: &Path,
    text: &str,
) -> Result<Vec<Setting>, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim().to_string(),
    })?;
    let subs = configurable_subcommands(cmd);
    let mut wanted = Vec::new();
    for (name, value) in &table {
        let Some(sub) = subs.iter().find(|s| s.get_name() == name) else {
            return Err(match value {
                toml::Value::Table(_) => ConfigError::UnknownTable {
                    path: path.to_path_buf(),
                    table: name.clone(),
                    known: subs
                        .iter()
                        .map(|s| format!("[{}]", s.get_name()))
                        .collect::<Vec<_>>()
                        .join(", "),
                },
                _ => ConfigError::NotInTable {
                    path: path.to_path_buf(),
                    key: name.clone(),
                },
            });
        };
        let toml::Value::Table(options) = value else {
            return Err(ConfigError::NotInTable {
                path: path.to_path_buf(),
                key: name.clone(),
            });
        };
        let settings = table_settings(sub, path, options)?;
        if name == subcommand {
            wanted = settings;
        }
    }
    Ok(wanted)
}

/// Checks every key of one table against `sub`'s options.
fn table_settings(
    sub: &Command,
    path: &Path,
    options: &toml::Table,
) -> Result<Vec<Setting>, ConfigError> {
    let table = sub.get_name().to_string();
    let mut out = Vec::new();
    for (key, value) in options {
        let norm = key.replace('-', "_");
        let Some(arg) = sub
            .get_arguments()
            .filter(|a| configurable(a))
            .find(|a| a.get_id().as_str() == norm)
        else {
            let known = sub
                .get_arguments()
                .filter(|a| configurable(a))
                .map(|a| a.get_id().as_str().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ConfigError::UnknownKey {
                path: path.to_path_buf(),
                table,
                key: key.clone(),
                known,
            });
        };
        let bad = |message: String| ConfigError::BadValue {
            path: path.to_path_buf(),
            table: table.clone(),
            key: key.clone(),
            message,
        };
        let long = arg.get_long().unwrap_or(arg.get_id().as_str());
        let is_flag = !arg.get_action().takes_values();
        let args: Vec<OsString> = if is_flag {
            match value {
                toml::Value::Boolean(true) => vec![format!("--{long}").into()],
                toml::Value::Boolean(false) => Vec::new(),
                _ => return Err(bad("expected true or false".into())),
            }
        } else {
            let s = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => return Err(bad("expected a string, number or boolean".into())),
            };
            vec![format!("--{long}={s}").into()]
        };
        // Run the option's own parser on the value alone, so a bad value is reported
        // against the file rather than as a command-line error.
        let probe = Command::new("config")
            .no_binary_name(true)
            .arg(arg.clone().required(false).env(None::<&str>));
        if let Err(e) = probe.try_get_matches_from(&args) {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            return Err(bad(first.to_string()));
        }
        out.push(Setting {
            id: arg.get_id().as_str().to_string(),
            args,
        });
    }
    Ok(out)
}

/// A copy of `cmd` where no argument is required, to find `--config` before the file
/// has supplied required options.
fn relaxed(cmd: Command) -> Command {
    cmd.mut_subcommands(|s| {
        let ids: Vec<clap::Id> = s.get_arguments().map(|a| a.get_id().clone()).collect();
        ids.iter()
            .fold(s, |s, id| s.mut_arg(id, |a| a.required(false)))
    })
}

/// Adds the settings of the config file named in `argv` (by `--config` or its
/// environment variable) to `argv`, for options that neither a flag nor an environment
/// variable set. Returns `argv` unchanged when no config file is named, or when
/// `argv` does not parse (so that clap reports that error, or prints the help, as
/// usual).
pub fn expand_args(cmd: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let Ok(matches) = relaxed(cmd.clone()).try_get_matches_from(&argv) else {
        return Ok(argv);
    };
    let Some((name, sub)) = matches.subcommand() else {
        return Ok(argv);
    };
    let Some(path) = config_path(sub) else {
        return Ok(argv);
    };
    let settings = load(cmd, name, &path)?;
    Ok(merge(argv, sub, settings))
}

fn config_path(sub: &ArgMatches) -> Option<PathBuf> {
    sub.try_get_one::<PathBuf>(CONFIG_ARG)
        .ok()
        .flatten()
        .cloned()
}

/// Appends the settings whose options came from no flag and no environment variable.
fn merge(mut argv: Vec<OsString>, sub: &ArgMatches, settings: Vec<Setting>) -> Vec<OsString> {
    for s in settings {
        let from_user = matches!(
            sub.value_source(&s.id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if !from_user {
            argv.extend(s.args);
        }
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command as Sub};
    use clap::{CommandFactory, Parser};

    fn resolve(args: &[&str]) -> Result<Cli, String> {
        let argv: Vec<OsString> = std::iter::once("farpool")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let argv = expand_args(&Cli::command(), argv).map_err(|e| e.to_string())?;
        Cli::try_parse_from(argv).map_err(|e| e.to_string())
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> String {
        let p = dir.path().join("farpool.toml");
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn controller(cli: Cli) -> crate::cli::ControllerArgs {
        match cli.command {
            Sub::Controller(a) => a,
            other => panic!("not a controller: {other:?}"),
        }
    }

    /// The only test that sets these variables (tests run in parallel in one process).
    #[test]
    fn flags_win_over_env_over_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            &dir,
            "[controller]\nlease_secs = 3\ngrace-secs = 0.25\nheartbeat_ms = 40\n\n[memnode]\ncapacity = \"8MiB\"\n",
        );
        std::env::set_var("FARPOOL_LEASE_SECS", "4");
        std::env::set_var("FARPOOL_GRACE_SECS", "0.5");
        let a = controller(resolve(&["controller", "--config", &f, "--lease-secs", "5"]).unwrap());
        assert_eq!(a.lease_secs, 5.0, "flag beats env and file");
        assert_eq!(a.grace_secs, 0.5, "env beats file");
        assert_eq!(a.heartbeat_ms, 40, "file beats default");
        assert_eq!(a.missed_heartbeats, 3, "default where nothing is set");
        let a = controller(resolve(&["controller", "--config", &f]).unwrap());
        assert_eq!(a.lease_secs, 4.0);
        std::env::remove_var("FARPOOL_LEASE_SECS");
        std::env::remove_var("FARPOOL_GRACE_SECS");
        let a = controller(resolve(&["controller", "--config", &f]).unwrap());
        assert_eq!((a.lease_secs, a.grace_secs), (3.0, 0.25));
        let a = controller(resolve(&["controller"]).unwrap());
        assert_eq!((a.lease_secs, a.heartbeat_ms), (10.0, 500));
    }

    #[test]
    fn file_supplies_required_options_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            &dir,
            "[memnode]\ncontroller = \"10.0.0.1:7070\"\ncapacity = \"8MiB\"\nno_lock = true\nno_hugepages = false\n",
        );
        let cli = resolve(&["memnode", "--config", &f]).unwrap();
        let Sub::Memnode(m) = cli.command else {
            panic!("not a memnode")
        };
        assert_eq!(m.controller, "10.0.0.1:7070");
        assert_eq!(m.capacity, 8 << 20);
        assert!(m.no_lock);
        assert!(!m.no_hugepages);
        // Without the file the required options are missing, as before.
        assert!(resolve(&["memnode"]).is_err());
    }

    #[test]
    fn errors_name_the_file_table_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "[controller]\nlease_sec = 3\n",
                "unknown key 'lease_sec' in [controller]",
            ),
            ("[controler]\nlease_secs = 3\n", "unknown table [controler]"),
            ("lease_secs = 3\n", "'lease_secs' must be inside a table"),
            (
                "[memnode]\ncapacity = \"lots\"\n",
                "bad value for 'capacity' in [memnode]",
            ),
            (
                "[controller]\nheartbeat_ms = -1\n",
                "bad value for 'heartbeat_ms'",
            ),
            (
                "[memnode]\nno_lock = \"yes\"\n",
                "bad value for 'no_lock' in [memnode]: expected true or false",
            ),
            (
                "[controller]\nlisten = [1]\n",
                "expected a string, number or boolean",
            ),
            ("[controller\n", "is not valid TOML"),
        ];
        for (text, want) in cases {
            let f = write(&dir, text);
            let e = resolve(&["controller", "--config", &f]).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains(&f), "names the file: {e}");
        }
        let missing = dir.path().join("nope.toml");
        let e = resolve(&["controller", "--config", missing.to_str().unwrap()]).unwrap_err();
        assert!(
            e.contains("cannot read config file") && e.contains("nope.toml"),
            "{e}"
        );
    }
}
