//! iptables-save and iptables-restore as the agent drives them: the parsed
//! dump, the script that removes someone's chains with their jumps, and the
//! command runner. The masquerade fallback and `cleanup --kube-proxy` share
//! them.

use std::{
    fmt::Write as _,
    io::{ErrorKind, Write as _},
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
};

/// The tables kube-proxy and the masquerade fallback write to.
pub const TABLES: &[&str] = &["nat", "filter", "mangle"];

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: ExitStatus,
        stderr: String,
    },
}

/// What an `iptables-restore --noflush` must do to remove someone's chains
/// from a dump.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RemovalScript {
    pub text: String,
    /// `table/chain` of every chain removed.
    pub chains: Vec<String>,
    /// Rules in other chains that jumped to them.
    pub jumps: usize,
}

/// Builds the restore input for an `iptables-save` dump: per table, delete
/// the jumps from other chains, flush the chains `owned` says are to go
/// (which drops their references to each other), then delete them.
pub fn removal_script(dump: &str, owned: fn(&str) -> bool) -> RemovalScript {
    let mut script = RemovalScript::default();
    for table in parse_dump(dump) {
        if !TABLES.contains(&table.name.as_str()) {
            continue;
        }
        let chains: Vec<&str> = table
            .chains
            .iter()
            .map(String::as_str)
            .filter(|c| owned(c))
            .collect();
        let jumps: Vec<&Rule> = table
            .rules
            .iter()
            .filter(|r| !owned(&r.chain))
            .filter(|r| r.target.as_deref().is_some_and(owned))
            .collect();
        if chains.is_empty() && jumps.is_empty() {
            continue;
        }
        let text = &mut script.text;
        let _ = writeln!(text, "*{}", table.name);
        for jump in &jumps {
            // The rule as saved, `-A` turned into `-D`: iptables deletes the
            // rule whose spec matches exactly.
            let _ = writeln!(text, "-D {}", jump.spec);
        }
        for chain in &chains {
            let _ = writeln!(text, ":{chain} - [0:0]");
        }
        for chain in &chains {
            let _ = writeln!(text, "-X {chain}");
        }
        script.text.push_str("COMMIT\n");
        script.jumps += jumps.len();
        script
            .chains
            .extend(chains.iter().map(|c| format!("{}/{c}", table.name)));
    }
    script
}

/// One table of an `iptables-save` dump.
#[derive(Debug, Default)]
pub struct Table {
    pub name: String,
    pub chains: Vec<String>,
    pub rules: Vec<Rule>,
}

/// One `-A` line.
#[derive(Debug)]
pub struct Rule {
    pub chain: String,
    /// Everything after `-A `.
    pub spec: String,
    /// The `-j`/`-g` target.
    pub target: Option<String>,
}

pub fn parse_dump(dump: &str) -> Vec<Table> {
    let mut tables: Vec<Table> = Vec::new();
    for line in dump.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            tables.push(Table {
                name: name.to_owned(),
                ..Table::default()
            });
            continue;
        }
        let Some(table) = tables.last_mut() else {
            continue;
        };
        if let Some(chain) = line.strip_prefix(':') {
            if let Some(name) = chain.split_whitespace().next() {
                table.chains.push(name.to_owned());
            }
        } else if let Some(spec) = line.strip_prefix("-A ") {
            let words = split_words(spec);
            let target = words
                .iter()
                .position(|w| matches!(w.as_str(), "-j" | "--jump" | "-g" | "--goto"))
                .and_then(|i| words.get(i + 1).cloned());
            table.rules.push(Rule {
                chain: words.first().cloned().unwrap_or_default(),
                spec: spec.to_owned(),
                target,
            });
        }
    }
    tables
}

/// Splits a saved rule into words as iptables-restore does: double quotes
/// group (comments hold spaces, and may hold `-j`), a backslash escapes.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                word.extend(chars.next());
                in_word = true;
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// A command's path, on PATH or in the sbin directories a container's or
/// a non-login shell's PATH may lack.
pub fn program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Runs a command to completion and returns its stdout.
pub fn run(program: &PathBuf, args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
    let name = || format!("{} {}", program.display(), args.join(" "));
    let spawn_error = |source| IptablesError::Spawn {
        program: name(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    // A command that fails before it has read all its input (a table the
    // kernel lacks) closes the pipe: its exit status and stderr say why,
    // the EPIPE does not.
    let mut unread = None;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        match pipe.write_all(input.as_bytes()) {
            Err(error) if error.kind() == ErrorKind::BrokenPipe => unread = Some(error),
            written => written.map_err(spawn_error)?,
        }
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        return Err(IptablesError::Failed {
            program: name(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    if let Some(error) = unread {
        return Err(spawn_error(error));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_iptables_quoting() {
        assert_eq!(
            split_words(r#"X -m comment --comment "a \"b\" -j C" -j D"#),
            [
                "X",
                "-m",
                "comment",
                "--comment",
                r#"a "b" -j C"#,
                "-j",
                "D"
            ]
        );
        assert_eq!(split_words(r#"X --comment """#), ["X", "--comment", ""]);
    }
}
