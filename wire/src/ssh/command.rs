//! Parsing the command of an SSH `exec` request (sans-I/O): what git, git-lfs or a person typed
//! after `ssh git@host`. Nothing here runs a shell; the command is split into words with the
//! subset of POSIX shell quoting that clients use, then matched against the few commands the
//! server runs. Everything else is refused with a message meant for a person.
//!
//! Accepted (`PATH` as git sends it, see [`repo_from_path`]):
//! - `git-upload-pack PATH`, `git-receive-pack PATH`, `git-upload-archive PATH`, and the same
//!   with a space (`git upload-pack PATH`);
//! - `git-lfs-authenticate PATH upload|download`;
//! - `git-lfs-transfer PATH upload|download` (the pure-SSH LFS protocol).

use crate::git::repo_name::{RepoName, RepoNameError};
use crate::git::service::Service;
use crate::lfs::api::Operation;

/// Longest exec command accepted, in bytes.
pub const MAX_COMMAND_LEN: usize = 4096;
const MAX_WORDS: usize = 8;

/// What a client may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecRequest {
    Git {
        service: Service,
        repo: RepoName,
    },
    LfsAuthenticate {
        repo: RepoName,
        operation: Operation,
    },
    LfsTransfer {
        repo: RepoName,
        operation: Operation,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("no command given")]
    Empty,
    #[error("the command is longer than {MAX_COMMAND_LEN} bytes")]
    TooLong,
    #[error("the command is not valid UTF-8")]
    NotUtf8,
    #[error("unbalanced quotes in the command")]
    Quoting,
    #[error("`{0}` is not a command this server runs; it runs only git-upload-pack, git-receive-pack, git-upload-archive, git-lfs-authenticate and git-lfs-transfer")]
    Unknown(String),
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("invalid repository path `{path}`: {source}")]
    BadRepo { path: String, source: RepoNameError },
}

/// Parses the raw bytes of an exec request.
pub fn parse_exec(raw: &[u8]) -> Result<ExecRequest, CommandError> {
    if raw.len() > MAX_COMMAND_LEN {
        return Err(CommandError::TooLong);
    }
    let text = std::str::from_utf8(raw).map_err(|_| CommandError::NotUtf8)?;
    let words = split_words(text)?;
    let mut words = words.iter().map(String::as_str);
    let first = words.next().ok_or(CommandError::Empty)?;
    // `git upload-pack` (with a space) is what some clients send; treat it as `git-upload-pack`.
    let (name, rest): (String, Vec<&str>) = if first == "git" {
        match words.next() {
            Some(sub) => (format!("git-{sub}"), words.collect()),
            None => return Err(CommandError::Unknown(first.to_owned())),
        }
    } else {
        (first.to_owned(), words.collect())
    };
    if let Some(service) = Service::from_wire(&name) {
        let [path] = rest.as_slice() else {
            return Err(CommandError::Usage(
                "git-upload-pack|git-receive-pack|git-upload-archive 'OWNER/NAME.git'",
            ));
        };
        return Ok(ExecRequest::Git {
            service,
            repo: repo_from_path(path)?,
        });
    }
    match name.as_str() {
        "git-lfs-authenticate" => {
            let [path, op] = rest.as_slice() else {
                return Err(CommandError::Usage(
                    "git-lfs-authenticate OWNER/NAME upload|download",
                ));
            };
            let operation = Operation::parse(op).ok_or(CommandError::Usage(
                "git-lfs-authenticate OWNER/NAME upload|download",
            ))?;
            Ok(ExecRequest::LfsAuthenticate {
                repo: repo_from_path(path)?,
                operation,
            })
        }
        "git-lfs-transfer" => {
            const USAGE: &str = "git-lfs-transfer OWNER/NAME upload|download";
            let [path, op] = rest.as_slice() else {
                return Err(CommandError::Usage(USAGE));
            };
            let operation = Operation::parse(op).ok_or(CommandError::Usage(USAGE))?;
            Ok(ExecRequest::LfsTransfer {
                repo: repo_from_path(path)?,
                operation,
            })
        }
        _ => Err(CommandError::Unknown(printable(&name))),
    }
}

/// Maps the path a client sends to a repository name:
/// - `OWNER/NAME[.git]` as sent for `git@host:OWNER/NAME.git`;
/// - `/OWNER/NAME[.git]` as sent for `ssh://git@host/OWNER/NAME.git`;
/// - `~/OWNER/NAME[.git]` (the home of `git` is the repositories root);
/// - `~OWNER/NAME[.git]`, read as "OWNER's repository NAME" (`ssh://git@host/~OWNER/NAME.git`).
///
/// One trailing `/` is ignored. The result is validated by [`RepoName`], so `..`, extra
/// segments and option-like names are refused.
pub fn repo_from_path(path: &str) -> Result<RepoName, CommandError> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let relative = if let Some(rest) = trimmed.strip_prefix("~/") {
        rest
    } else if let Some(rest) = trimmed.strip_prefix('~') {
        rest
    } else {
        trimmed.strip_prefix('/').unwrap_or(trimmed)
    };
    RepoName::parse(relative).map_err(|source| CommandError::BadRepo {
        path: printable(path),
        source,
    })
}

/// Splits a command into words: blanks separate words; `'...'` quotes literally; outside single
/// quotes, `\` escapes the next character and `"..."` quotes with `\"` and `\\` escapes. That
/// covers git's own quoting (`'a'\''b'`, `'\!'`) and git-lfs's.
pub fn split_words(text: &str) -> Result<Vec<String>, CommandError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(CommandError::Quoting),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(CommandError::Quoting),
                        },
                        Some(c) => word.push(c),
                        None => return Err(CommandError::Quoting),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.push(chars.next().ok_or(CommandError::Quoting)?);
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
        if words.len() > MAX_WORDS {
            return Err(CommandError::Usage("too many arguments"));
        }
    }
    if in_word {
        words.push(word);
    }
    if words.is_empty() {
        return Err(CommandError::Empty);
    }
    Ok(words)
}

/// A short, escaped copy of client text for messages and logs.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().count() > 64 {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    fn git(service: Service, r: &str) -> Result<ExecRequest, CommandError> {
        Ok(ExecRequest::Git {
            service,
            repo: repo(r),
        })
    }

    #[test]
    fn git_commands_in_the_forms_clients_send() {
        use Service::*;
        for (cmd, want) in [
            (
                "git-upload-pack 'alice/proj.git'",
                git(UploadPack, "alice/proj"),
            ),
            (
                "git-upload-pack '/alice/proj.git'",
                git(UploadPack, "alice/proj"),
            ),
            (
                "git-receive-pack '~/alice/proj.git'",
                git(ReceivePack, "alice/proj"),
            ),
            (
                "git-receive-pack '~alice/proj.git'",
                git(ReceivePack, "alice/proj"),
            ),
            (
                "git-upload-archive 'alice/proj'",
                git(UploadArchive, "alice/proj"),
            ),
            (
                "git upload-pack 'alice/proj.git'",
                git(UploadPack, "alice/proj"),
            ),
            (
                "git-upload-pack alice/proj.git/",
                git(UploadPack, "alice/proj"),
            ),
            (
                "git-upload-pack  \"alice/proj.git\" ",
                git(UploadPack, "alice/proj"),
            ),
            // git quotes `!` and `'` this way; neither is valid in a name, but the split is right.
            (
                "git-upload-pack 'alice/pr'\\''oj'",
                Err(CommandError::BadRepo {
                    path: "alice/pr\\'oj".into(),
                    source: RepoNameError::InvalidChar {
                        segment: crate::git::repo_name::Segment::Name,
                        ch: '\'',
                    },
                }),
            ),
        ] {
            assert_eq!(parse_exec(cmd.as_bytes()), want, "{cmd}");
        }
    }

    #[test]
    fn lfs_authenticate() {
        assert_eq!(
            parse_exec(b"git-lfs-authenticate alice/proj.git download"),
            Ok(ExecRequest::LfsAuthenticate {
                repo: repo("alice/proj"),
                operation: Operation::Download
            })
        );
        assert_eq!(
            parse_exec(b"git-lfs-authenticate '/alice/proj' upload"),
            Ok(ExecRequest::LfsAuthenticate {
                repo: repo("alice/proj"),
                operation: Operation::Upload
            })
        );
        assert!(matches!(
            parse_exec(b"git-lfs-authenticate alice/proj delete"),
            Err(CommandError::Usage(_))
        ));
        assert_eq!(
            parse_exec(b"git-lfs-transfer '/alice/proj.git' download"),
            Ok(ExecRequest::LfsTransfer {
                repo: repo("alice/proj"),
                operation: Operation::Download
            })
        );
        assert!(matches!(
            parse_exec(b"git-lfs-transfer alice/proj lock"),
            Err(CommandError::Usage(_))
        ));
    }

    #[test]
    fn refusals() {
        assert_eq!(parse_exec(b""), Err(CommandError::Empty));
        assert_eq!(parse_exec(b"   "), Err(CommandError::Empty));
        assert_eq!(
            parse_exec(b"bash"),
            Err(CommandError::Unknown("bash".into()))
        );
        assert_eq!(
            parse_exec(b"git-shell -c x"),
            Err(CommandError::Unknown("git-shell".into()))
        );
        assert_eq!(parse_exec(b"git"), Err(CommandError::Unknown("git".into())));
        assert!(matches!(
            parse_exec(b"git-upload-pack"),
            Err(CommandError::Usage(_))
        ));
        assert!(matches!(
            parse_exec(b"git-upload-pack a/b c/d"),
            Err(CommandError::Usage(_))
        ));
        assert_eq!(
            parse_exec(b"git-upload-pack 'a/b"),
            Err(CommandError::Quoting)
        );
        assert_eq!(parse_exec(b"\xff"), Err(CommandError::NotUtf8));
        assert_eq!(
            parse_exec(&vec![b'a'; MAX_COMMAND_LEN + 1]),
            Err(CommandError::TooLong)
        );
        // Traversal, option injection and extra segments all fail name validation.
        for path in [
            "'../etc/passwd'",
            "'/a/../b'",
            "'--upload-pack=x/y'",
            "'a/b/c'",
            "'/'",
            "'~'",
            "'~/'",
        ] {
            let cmd = format!("git-upload-pack {path}");
            assert!(
                matches!(
                    parse_exec(cmd.as_bytes()),
                    Err(CommandError::BadRepo { .. })
                ),
                "{cmd}"
            );
        }
        // Escaped in messages.
        assert_eq!(
            parse_exec(b"rm\n-rf"),
            Err(CommandError::Unknown("rm\\n-rf".into()))
        );
    }

    #[test]
    fn word_splitting() {
        assert_eq!(split_words("a  'b c'\td").unwrap(), ["a", "b c", "d"]);
        assert_eq!(split_words("'a'\\''b'").unwrap(), ["a'b"]);
        assert_eq!(split_words("'a'\\!").unwrap(), ["a!"]);
        assert_eq!(split_words("\"a\\\"b\\x\"").unwrap(), ["a\"b\\x"]);
        assert_eq!(split_words("''").unwrap(), [""]);
        assert_eq!(split_words("a\\"), Err(CommandError::Quoting));
        assert!(split_words("a b c d e f g h i j").is_err());
    }
}
