//! The interactive shell (no command given): `put`, `get`, `delete`, `status`, `help`, `quit`,
//! with line editing and history; Ctrl-C clears the line, Ctrl-D (or `quit`) leaves.

use rustyline::error::ReadlineError;

use crate::commands;
use crate::session::{Op, Session};

const HELP: &str = "commands:
  put KEY VALUE     store VALUE (the rest of the line) under KEY
  get KEY           print the value of KEY
  delete KEY        remove KEY
  status            every member's state
  help              this text
  quit              leave (or Ctrl-D)";

/// A parsed shell line.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// Nothing to do.
    Empty,
    /// A key-value operation.
    Op(Op),
    /// Status table.
    Status,
    /// Help text.
    Help,
    /// Leave.
    Quit,
}

/// Parses one line, or says what is wrong with it.
pub fn parse(line: &str) -> Result<Line, String> {
    let line = line.trim();
    let (word, rest) = line.split_once(char::is_whitespace).map_or((line, ""), |(w, r)| (w, r.trim()));
    let one_key = |what: &str| -> Result<String, String> {
        if rest.is_empty() || rest.contains(char::is_whitespace) {
            Err(format!("usage: {what} KEY"))
        } else {
            Ok(rest.to_string())
        }
    };
    match word.to_ascii_lowercase().as_str() {
        "" => Ok(Line::Empty),
        "put" | "set" => match rest.split_once(char::is_whitespace) {
            Some((key, value)) if !value.trim().is_empty() => {
                Ok(Line::Op(Op::Put(key.to_string(), value.trim().as_bytes().to_vec())))
            }
            _ => Err("usage: put KEY VALUE".into()),
        },
        "get" => one_key("get").map(|k| Line::Op(Op::Get(k))),
        "delete" | "del" => one_key("delete").map(|k| Line::Op(Op::Delete(k))),
        "status" => Ok(Line::Status),
        "help" | "?" => Ok(Line::Help),
        "quit" | "exit" => Ok(Line::Quit),
        other => Err(format!("unknown command {other:?}; type help")),
    }
}

/// Runs the shell until the user leaves; returns the exit status.
pub async fn run(session: &mut Session, json: bool) -> i32 {
    let mut editor = match rustyline::DefaultEditor::new() {
        Ok(editor) => editor,
        Err(e) => {
            eprintln!("waxos: cannot open the interactive shell: {e}");
            return 1;
        }
    };
    let history = std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".waxos_history"));
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    outln!("waxos shell on {} — type help, Ctrl-D to leave", session.server());
    loop {
        let prompt = format!("waxos {}> ", session.server());
        let line = match tokio::task::block_in_place(|| editor.readline(&prompt)) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("waxos: {e}");
                break;
            }
        };
        if !line.trim().is_empty() {
            let _ = editor.add_history_entry(line.as_str());
        }
        match parse(&line) {
            Ok(Line::Empty) => {}
            Ok(Line::Help) => outln!("{HELP}"),
            Ok(Line::Quit) => break,
            Ok(Line::Status) => {
                commands::status(session, json).await;
            }
            Ok(Line::Op(op)) => {
                let code = commands::single(session, op).await;
                if code == commands::EXIT_OK {
                    outln!("ok");
                }
            }
            Err(message) => eprintln!("{message}"),
        }
    }
    if let Some(path) = &history {
        let _ = editor.save_history(path);
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_explains_bad_syntax() {
        assert_eq!(parse("  "), Ok(Line::Empty));
        assert_eq!(parse("put k hello world"), Ok(Line::Op(Op::Put("k".into(), b"hello world".to_vec()))));
        assert_eq!(parse("GET k"), Ok(Line::Op(Op::Get("k".into()))));
        assert_eq!(parse("delete k"), Ok(Line::Op(Op::Delete("k".into()))));
        assert_eq!(parse("quit"), Ok(Line::Quit));
        assert_eq!(parse("put k"), Err("usage: put KEY VALUE".into()));
        assert_eq!(parse("get"), Err("usage: get KEY".into()));
        assert_eq!(parse("get a b"), Err("usage: get KEY".into()));
        assert!(parse("frobnicate").unwrap_err().contains("type help"));
    }
}
