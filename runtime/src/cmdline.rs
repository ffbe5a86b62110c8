//! The kernel command line: `key=value` kernel options, then `--`, then the service's
//! arguments. Example: `app=spin log=info -- 1000000000`.

use alloc::vec::Vec;

/// A parsed command line, borrowing from the original string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine<'a> {
    /// `key=value` options before `--`, in order.
    pub options: Vec<(&'a str, &'a str)>,
    /// Arguments after `--`, for the service.
    pub args: Vec<&'a str>,
}

/// Why a command line could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLineError<'a> {
    /// A token before `--` that is not `key=value`.
    NotKeyValue(&'a str),
}

impl core::fmt::Display for CommandLineError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CommandLineError::NotKeyValue(t) => {
                write!(f, "kernel option '{t}' is not key=value (service arguments go after '--')")
            }
        }
    }
}

impl<'a> CommandLine<'a> {
    /// Parses `text`.
    pub fn parse(text: &'a str) -> Result<Self, CommandLineError<'a>> {
        let mut options = Vec::new();
        let mut args = Vec::new();
        let mut tokens = text.split_ascii_whitespace();
        for token in tokens.by_ref() {
            if token == "--" {
                break;
            }
            match token.split_once('=') {
                Some((k, v)) if !k.is_empty() => options.push((k, v)),
                _ => return Err(CommandLineError::NotKeyValue(token)),
            }
        }
        args.extend(tokens);
        Ok(CommandLine { options, args })
    }

    /// The last value given for `key`.
    pub fn option(&self, key: &str) -> Option<&'a str> {
        self.options.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_options_and_args() {
        let c = CommandLine::parse("app=spin log=debug -- 100 x").unwrap();
        assert_eq!(c.option("app"), Some("spin"));
        assert_eq!(c.option("log"), Some("debug"));
        assert_eq!(c.args, ["100", "x"]);
    }

    #[test]
    fn later_option_wins_and_no_args_is_fine() {
        let c = CommandLine::parse("app=a app=b").unwrap();
        assert_eq!(c.option("app"), Some("b"));
        assert!(c.args.is_empty());
    }

    #[test]
    fn rejects_bare_words_before_dashes() {
        assert_eq!(CommandLine::parse("app=x oops -- 1"), Err(CommandLineError::NotKeyValue("oops")));
        assert_eq!(CommandLine::parse("=v"), Err(CommandLineError::NotKeyValue("=v")));
    }
}
