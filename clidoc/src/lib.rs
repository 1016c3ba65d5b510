//! Shell completions and man pages for the punch binaries, generated from
//! their clap definitions so that they never drift from `--help`, and the
//! check that every flag can also be set from the environment.

use clap::{Command, Subcommand};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// The `completions` and `man` subcommands both binaries carry
/// (`#[command(flatten)]` into their own subcommand enum).
#[derive(Subcommand, Debug, Clone)]
pub enum DocsCmd {
    /// Print a shell completion script on stdout, e.g.
    /// `punch-agent completions bash > /etc/bash_completion.d/punch-agent`
    /// (zsh: into a directory on $fpath as `_punch-agent`; fish: into
    /// ~/.config/fish/completions/punch-agent.fish).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: Shell,
    },
    /// Write man pages: the command's own and one per subcommand
    /// (`punch-agent-serve.1`, …) into --out, or the command's own page on
    /// stdout (`punch-agent man | man -l -`).
    Man {
        /// Directory to write the pages into (created if missing), e.g.
        /// /usr/local/share/man/man1.
        #[arg(long, env = "PUNCH_MAN_DIR", value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

/// Runs a docs subcommand for the binary `cmd` describes.
pub fn run(docs: &DocsCmd, cmd: Command) -> io::Result<()> {
    match docs {
        DocsCmd::Completions { shell } => {
            let mut cmd = cmd;
            let name = cmd.get_name().to_string();
            let mut out = io::stdout().lock();
            clap_complete::generate(*shell, &mut cmd, name, &mut out);
            out.flush()
        }
        DocsCmd::Man { out: None } => {
            let mut out = io::stdout().lock();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            out.flush()
        }
        DocsCmd::Man { out: Some(dir) } => {
            for path in man_pages(cmd, dir)? {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

/// Writes `NAME.1` and `NAME-SUB.1` for every visible subcommand into
/// `dir`; returns the paths written.
pub fn man_pages(cmd: Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    // Global flags reach the subcommands only once the command is built.
    cmd.build();
    let name = cmd.get_name().to_string();
    let mut written = Vec::new();
    let mut page = |c: Command, file: String| -> io::Result<()> {
        let path = dir.join(format!("{file}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(c).render(&mut buf)?;
        std::fs::write(&path, buf)?;
        written.push(path);
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        let full = format!("{name}-{}", sub.get_name());
        page(sub.clone().name(full.clone()).bin_name(full.clone()), full)?;
    }
    page(cmd, name)?;
    Ok(written)
}

/// Every visible option of `cmd` and its subcommands that has no env var,
/// as `SUBCOMMAND --flag`; positional arguments, `--help` and
/// `--version` are not options in this sense.
pub fn flags_without_env(cmd: &Command) -> Vec<String> {
    let mut cmd = cmd.clone();
    cmd.build();
    let mut missing = Vec::new();
    walk(&cmd, "", &mut missing);
    missing
}

/// For a binary's tests: its command line is well formed (clap's own
/// checks) and every option has an env var; panics naming what is wrong.
/// Containers and units configure the binaries through the environment
/// alone, so a new option without a `PUNCH_*` name fails here.
pub fn assert_complete(cmd: Command) {
    let missing = flags_without_env(&cmd);
    assert!(missing.is_empty(), "options without env: {missing:?}");
    cmd.debug_assert();
}

fn walk(cmd: &Command, path: &str, missing: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        let builtin = matches!(arg.get_id().as_str(), "help" | "version");
        if arg.is_positional()
            || arg.is_hide_set()
            || builtin
            || arg.is_global_set() && !path.is_empty()
        {
            continue;
        }
        if arg.get_env().is_none() {
            let flag = arg
                .get_long()
                .map(|l| format!("--{l}"))
                .unwrap_or_else(|| arg.get_id().to_string());
            missing.push(format!("{path}{flag}").trim().to_string());
        }
    }
    for sub in cmd.get_subcommands() {
        if sub.get_name() != "help" {
            walk(sub, &format!("{path}{} ", sub.get_name()), missing);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn demo() -> Command {
        Command::new("demo")
            .arg(
                Arg::new("server")
                    .long("server")
                    .env("DEMO_SERVER")
                    .global(true),
            )
            .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue))
            .subcommand(
                Command::new("run")
                    .about("Runs it")
                    .arg(Arg::new("target"))
                    .arg(Arg::new("json").long("json").action(ArgAction::SetTrue)),
            )
    }

    #[test]
    fn options_without_env_are_named_with_their_subcommand() {
        assert_eq!(flags_without_env(&demo()), ["--quiet", "run --json"]);
    }

    #[test]
    fn one_man_page_per_subcommand_with_the_global_flags() {
        let dir = tempfile::tempdir().unwrap();
        let written = man_pages(demo(), dir.path()).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["demo-run.1", "demo.1"]);
        let run = std::fs::read_to_string(dir.path().join("demo-run.1")).unwrap();
        assert!(run.contains("demo\\-run"), "{run}");
        assert!(run.contains("\\-\\-server"), "global flag missing: {run}");
        assert!(run.contains("DEMO_SERVER"), "env var missing: {run}");
    }
}
