//! Redis glob patterns (KEYS, CONFIG GET): `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\` escapes.
//!
//! The pattern is compiled once into tokens exactly as Redis's `stringmatchlen` reads it
//! (including its treatment of odd patterns: a reversed range `[z-a]` is swapped, an
//! unterminated `[` class runs to the end of the pattern, a trailing `\` is a literal), then
//! matched without recursion in O(pattern × string) time, so no pattern can take exponential
//! time. Like Redis, an empty string is matched only by an empty pattern.

use alloc::vec::Vec;

/// One element of a `[…]` class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    /// A plain byte (compared case-insensitively under `nocase`).
    Byte(u8),
    /// A `\`-escaped byte (always compared exactly, as in Redis).
    Escaped(u8),
    /// An inclusive range, bounds in order.
    Range(u8, u8),
}

/// One pattern element; all but `Star` match exactly one byte.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Star,
    Any,
    Byte(u8),
    Class { negate: bool, items: Vec<Item> },
}

/// A compiled glob pattern.
#[derive(Debug, Clone)]
pub struct Glob {
    tokens: Vec<Token>,
    nocase: bool,
    empty: bool,
}

impl Glob {
    /// Compiles `pattern`; with `nocase`, ASCII letters match either case.
    pub fn new(pattern: &[u8], nocase: bool) -> Self {
        let at = |i: usize| pattern.get(i).copied().unwrap_or(0);
        let mut tokens = Vec::new();
        let mut p = 0;
        while p < pattern.len() {
            match at(p) {
                b'*' => {
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                }
                b'?' => tokens.push(Token::Any),
                b'[' => {
                    p += 1;
                    let negate = p < pattern.len() && at(p) == b'^';
                    if negate {
                        p += 1;
                    }
                    let mut items = Vec::new();
                    loop {
                        let left = pattern.len().saturating_sub(p);
                        if at(p) == b'\\' && left >= 2 {
                            p += 1;
                            items.push(Item::Escaped(at(p)));
                        } else if left == 0 {
                            // Unterminated: Redis backs up to the last byte and stops.
                            p -= 1;
                            break;
                        } else if at(p) == b']' {
                            break;
                        } else if left >= 3 && at(p + 1) == b'-' {
                            let (a, b) = (at(p), at(p + 2));
                            items.push(Item::Range(a.min(b), a.max(b)));
                            p += 2;
                        } else {
                            items.push(Item::Byte(at(p)));
                        }
                        p += 1;
                    }
                    tokens.push(Token::Class { negate, items });
                }
                b'\\' if p + 1 < pattern.len() => {
                    p += 1;
                    tokens.push(Token::Byte(at(p)));
                }
                b => tokens.push(Token::Byte(b)),
            }
            p += 1;
        }
        Self { tokens, nocase, empty: pattern.is_empty() }
    }

    /// Whether `s` matches the whole pattern.
    pub fn matches(&self, s: &[u8]) -> bool {
        if s.is_empty() {
            return self.empty;
        }
        let (mut t, mut i) = (0, 0);
        // Last star seen: its token index and the string position it is trying to stop at.
        let mut star: Option<(usize, usize)> = None;
        while let Some(&c) = s.get(i) {
            match self.tokens.get(t) {
                Some(Token::Star) => {
                    star = Some((t, i));
                    t += 1;
                }
                Some(tok) if self.one(tok, c) => {
                    t += 1;
                    i += 1;
                }
                _ => match star {
                    Some((st, si)) => {
                        star = Some((st, si + 1));
                        t = st + 1;
                        i = si + 1;
                    }
                    None => return false,
                },
            }
        }
        self.tokens.get(t..).unwrap_or(&[]).iter().all(|tok| *tok == Token::Star)
    }

    /// Whether the one-byte token `tok` matches `c`.
    fn one(&self, tok: &Token, c: u8) -> bool {
        let fold = |b: u8| if self.nocase { b.to_ascii_lowercase() } else { b };
        match tok {
            Token::Star => false,
            Token::Any => true,
            Token::Byte(b) => fold(*b) == fold(c),
            Token::Class { negate, items } => {
                let hit = items.iter().any(|item| match *item {
                    Item::Byte(b) => fold(b) == fold(c),
                    Item::Escaped(b) => b == c,
                    Item::Range(lo, hi) => (fold(lo)..=fold(hi)).contains(&fold(c)),
                });
                hit != *negate
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        Glob::new(p.as_bytes(), false).matches(s.as_bytes())
    }

    #[test]
    fn stars_and_question_marks() {
        assert!(m("*", "anything"));
        assert!(m("h?llo", "hello") && m("h?llo", "hallo") && !m("h?llo", "hllo"));
        assert!(m("h*llo", "hllo") && m("h*llo", "heeeello") && !m("h*llo", "hellO"));
        assert!(m("*a*b*", "xxaxxbxx") && !m("*a*b*", "xxbxxaxx"));
        assert!(m("a**b", "ab") && m("***", "x"));
        assert!(!m("a", "ab") && !m("ab", "a") && m("a*", "a"));
    }

    #[test]
    fn classes() {
        assert!(m("h[ae]llo", "hello") && m("h[ae]llo", "hallo") && !m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo") && !m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo") && !m("h[a-b]llo", "hcllo"));
        assert!(m("[z-a]", "m"), "reversed ranges are swapped");
        assert!(m("[\\]]", "]") && m("[a\\-z]", "-") && !m("[a\\-z]", "m"));
        assert!(!m("[]", "]") && !m("[]", "x"), "[] never matches");
    }

    #[test]
    fn escapes() {
        assert!(m("\\*", "*") && !m("\\*", "a"));
        assert!(m("a\\?", "a?") && !m("a\\?", "ab"));
        assert!(m("a\\", "a\\"), "a trailing backslash is literal");
    }

    #[test]
    fn odd_patterns_behave_as_in_redis() {
        // Unterminated classes: `[` matches nothing, `[^` any one byte, `[ab` is `[ab]`.
        assert!(!m("[", "[") && !m("[", "a"));
        assert!(m("[^", "x") && !m("[^", "xy"));
        assert!(m("x[ab", "xb") && !m("x[ab", "xc"));
        // Only an empty pattern matches an empty string (KEYS * special-cases it).
        assert!(!m("*", "") && m("", "") && !m("?", ""));
    }

    #[test]
    fn nocase_folds_ascii() {
        let g = Glob::new(b"APPEND*", true);
        assert!(g.matches(b"appendonly") && g.matches(b"AppendOnly"));
        assert!(Glob::new(b"[A-Z]x", true).matches(b"qX"));
        assert!(!Glob::new(b"[\\A]", true).matches(b"a"), "escaped class bytes compare exactly");
    }

    #[test]
    fn binary_bytes_match() {
        let g = Glob::new(b"\x00*\xff", false);
        assert!(g.matches(b"\x00abc\xff") && !g.matches(b"\x00abc"));
    }

    // 24 keys and 400 patterns (60% derived from a key) sent to redis-server 7.0.15 with
    // SET and KEYS; each mask has bit i set when KEYS returned GLOB_KEYS[i].
    const GLOB_KEYS: &[&[u8]] = &[
        b"*", b"*b", b"-[b*b", b"-b?]*\\", b"?\\bb", b"?a??^a", b"[", b"[[?", b"[\\?\\", b"\\]?", b"\\ba", b"]*cb?",
        b"]-c", b"]?\\]^[", b"]^", b"^a?b-", b"^b-b", b"^c[c\\", b"a*", b"a*-ab", b"a?-\\*", b"ab*?", b"b", b"c^a",
    ];

    const GLOB_CASES: &[(&[u8], u32)] = &[
        (b"[]-]*", 0x000000),
        (b"*?[?b]", 0x290a96),
        (b"[^b]^", 0x004000),
        (b"?b][a", 0x000000),
        (b"cb", 0x000000),
        (b"[*?", 0x000001),
        (b"*[^b]?", 0xbf73ae),
        (b"?\\bb", 0x000000),
        (b"a[bb][*b]?", 0x200000),
        (b"-[^a][ba]*b", 0x000004),
        (b"]*?[b-]?", 0x000800),
        (b"\\]*\\cb\\?", 0x000800),
        (b"*[\\b]\\bb", 0x000000),
        (b"[", 0x000000),
        (b"?\\b?", 0x000400),
        (b"b", 0x400000),
        (b"[c[[a-c]*", 0xfc01c0),
        (b"[^a]b-b", 0x010000),
        (b"[[?", 0x000040),
        (b"]*c\\b?", 0x000800),
        (b"^[a-c]b", 0x000000),
        (b"b*b", 0x000000),
        (b"[[b]", 0x400040),
        (b"[^a]a^a[", 0x000000),
        (b"[^a]", 0x400041),
        (b"[a-c]b[a-c]*", 0x000000),
        (b"[^b]*??\\^a", 0x000020),
        (b"?*??^*", 0x002020),
        (b"a[c-", 0x000000),
        (b"*", 0xffffff),
        (b"b-bc][^a]", 0x000000),
        (b"?b?[^a]", 0x210000),
        (b"[cb]^a", 0x800000),
        (b"*?[^a][^a]", 0x33bb9c),
        (b"cc", 0x000000),
        (b"**a", 0x800420),
        (b"^*???", 0x038000),
        (b"^-a[a-c]b", 0x000000),
        (b"a*??[a-c]", 0x080000),
        (b"^?[^b]*[^a]", 0x038000),
        (b"b*a?", 0x000000),
        (b"ba", 0x000000),
        (b"?c", 0x000000),
        (b"bb", 0x000000),
        (b"?a?b-", 0x008000),
        (b"?[?-][\\b]][^a][[-]", 0x000000),
        (b"bb[a-c]*b", 0x000000),
        (b"*\\?*", 0x30abb8),
        (b"a?*?", 0x380000),
        (b"[bb]", 0x400000),
        (b"?", 0x400041),
        (b"aab", 0x000000),
        (b"\\", 0x000000),
        (b"a[-]", 0x000000),
        (b"\\ca", 0x000000),
        (b"\\*?", 0x000002),
        (b"?a?***", 0x008020),
        (b"]a[?a]b[--]", 0x000000),
        (b"][", 0x000000),
        (b"ab", 0x000000),
        (b"]ca", 0x000000),
        (b"]-?", 0x001000),
        (b"*??", 0xbfffbe),
        (b"]***?", 0x007800),
        (b"*[ab]???a", 0x000020),
        (b"*[[bb][*a]*", 0x200404),
        (b"][a-c][b^", 0x000000),
        (b"c*a", 0x800000),
        (b"a]bb[a-c]", 0x000000),
        (b"^b-*", 0x010000),
        (b"aba*ba", 0x000000),
        (b"[aa][?b]-\\*", 0x000000),
        (b"?a^[a-c]", 0x000000),
        (b"^*bb", 0x000000),
        (b"-?b?b", 0x000004),
        (b"*-?", 0x011000),
        (b"a**?*", 0x3c0000),
        (b"*\\*", 0x140001),
        (b"*?\\*?", 0x20000c),
        (b"\\]*", 0x007800),
        (b"?b", 0x000002),
        (b"^[^b][-a]*", 0x000000),
        (b"[*a", 0x000001),
        (b"-??\\]**", 0x000008),
        (b"[^a][^b]", 0x004000),
        (b"*ba", 0x000400),
        (b"?[b", 0x000002),
        (b"**", 0xffffff),
        (b"?b??", 0x210000),
        (b"a[a-c][a-c]a", 0x000000),
        (b"b*[[^a]\\", 0x000000),
        (b"*b", 0x490016),
        (b"[]b]?\\][^a][[-]", 0x000000),
        (b"c", 0x000000),
        (b"^\\a[?b][^a]?", 0x008000),
        (b"*??c\\", 0x020000),
        (b"]]b-", 0x000000),
        (b"[[a]\\\\?[\\-]", 0x000000),
        (b"a?*\\[*-]", 0x000000),
        (b"^ab][^a]", 0x000000),
        (b"]?", 0x004000),
        (b"?\\*b", 0x000000),
        (b"b-[a-c]a", 0x000000),
        (b"?\\b[ba]", 0x000400),
        (b"a]b[a-c]b", 0x000000),
        (b"\\??", 0x000000),
        (b"a", 0x000000),
        (b"?[^a]", 0x044002),
        (b"a[?", 0x000000),
        (b"]b?*a]", 0x000000),
        (b"^a", 0x000000),
        (b"][a]*a", 0x000000),
        (b"[^a]-b*^*", 0x000000),
        (b"*]?", 0x004200),
        (b"]aa\\", 0x000000),
        (b"**c", 0x001000),
        (b"?^*?[^b]a", 0x000000),
        (b"*?[?a]]*[\\b]", 0x000000),
        (b"bab^", 0x000000),
        (b"^?[[b]*[^b]", 0x020000),
        (b"\\*b", 0x000002),
        (b"[?[", 0x000040),
        (b"a?bbb", 0x000000),
        (b"?\\?\\", 0x000000),
        (b"^", 0x000000),
        (b"[a-c]][a-c]?", 0x000000),
        (b"c^ca", 0x000000),
        (b"?[^a]b[a-c]c\\", 0x000000),
        (b"\\\\ba", 0x000400),
        (b"]?*", 0x007800),
        (b"cc[c?", 0x000000),
        (b"[^b]?*\\]*?", 0x002008),
        (b"ab??", 0x200000),
        (b"[???", 0x000000),
        (b"?*", 0xffffff),
        (b"*[*", 0x140001),
        (b"*\\b", 0x490016),
        (b"[a?*", 0x000001),
        (b"b[", 0x000000),
        (b"[^b]a?*^a", 0x000020),
        (b"[*a]*", 0x3c0003),
        (b"[^a]a", 0x000000),
        (b"a[c\\", 0x000000),
        (b"**[?-]?a", 0xa22fe8),
        (b"?]a?b\\", 0x000000),
        (b"]a[^a][a-c]", 0x000000),
        (b"a*]", 0x000000),
        (b"a]", 0x000000),
        (b"b[^a]b]", 0x000000),
        (b"\\]?*b?", 0x000800),
        (b"b-c", 0x000000),
        (b"??*", 0xbfffbe),
        (b"[[a]", 0x000040),
        (b"[a\\a", 0x000000),
        (b"a[a-c]", 0x000000),
        (b"]\\[^a]*[^a]", 0x000000),
        (b"?[*-]", 0x040000),
        (b"*?cb*", 0x000800),
        (b"*b*?", 0x218c1c),
        (b"a?[-a][^b][^b]", 0x100000),
        (b"[^b][?", 0x000000),
        (b"*[^a]ba*", 0x000400),
        (b"a^a", 0x000000),
        (b"a[^a]", 0x040000),
        (b"a*?a\\b", 0x080000),
        (b"b[^a]", 0x000000),
        (b"^\\b-b", 0x010000),
        (b"*??b?", 0x008810),
        (b"[a-c][a-c]", 0x000000),
        (b"*b-\\b", 0x010000),
        (b"^[cb]?c\\", 0x020000),
        (b"[^a][b??", 0x000002),
        (b"a[bab", 0x000000),
        (b"?\\[^b]b", 0x000000),
        (b"[**", 0x000001),
        (b"*[]a][^b]", 0x000000),
        (b"\\?**b", 0x000010),
        (b"[*?\\", 0x000001),
        (b"[^b]?", 0x044002),
        (b"??c", 0x001000),
        (b"a**?b", 0x080000),
        (b"[^a]b[-a]\\*", 0x000000),
        (b"*c[\\c\\", 0x020000),
        (b"[??", 0x000000),
        (b"c^?", 0x800000),
        (b"a[^b]?\\*", 0x000000),
        (b"*??b", 0x090014),
        (b"[*][\\*", 0x000000),
        (b"a?-^*", 0x000000),
        (b"]", 0x000000),
        (b"\\?", 0x000000),
        (b"\\\\b\\", 0x000000),
        (b"aa", 0x000000),
        (b"a[*a]-**", 0x080000),
        (b"^*[c\\", 0x020000),
        (b"*?-\\\\*", 0x100000),
        (b"*?[[]?", 0x000080),
        (b"-^[^a]?\\", 0x000000),
        (b"a]-[a-c]", 0x000000),
        (b"^*?b-", 0x008000),
        (b"*?\\]*\\[", 0x002000),
        (b"?a?\\^?", 0x000000),
        (b"a\\?-\\*", 0x000000),
        (b"[^b]b?[^a][*b]?", 0x000008),
        (b"c]a*^", 0x000000),
        (b"a*-[ab][^a]", 0x080000),
        (b"-b[c^^", 0x000000),
        (b"\\*c", 0x000000),
        (b"a??[\\-]*", 0x000000),
        (b"c*b[\\-", 0x000000),
        (b"[[a]??", 0x000080),
        (b"?\\b[^a]", 0x000000),
        (b"?b\\?**[^a]", 0x000008),
        (b"?*?\\*", 0x100000),
        (b"]?\\]^[", 0x000000),
        (b"b\\[^a]*ac", 0x000000),
        (b"][?a", 0x000000),
        (b"*[a-c]]b", 0x000000),
        (b"*^", 0x004000),
        (b"^*??-", 0x008000),
        (b"-[", 0x000000),
        (b"\\a?", 0x040000),
        (b"[]b^*", 0x000000),
        (b"]-", 0x000000),
        (b"aa?", 0x000000),
        (b"[\\?b*?", 0x400001),
        (b"*[a-c]]^*", 0x000000),
        (b"-[\\b*?", 0x000000),
        (b"aa[^a]", 0x000000),
        (b"^?[a-c]-", 0x000000),
        (b"[[a-c][^a]*", 0xbc0180),
        (b"]-c", 0x001000),
        (b"c[^-][ab]", 0x800000),
        (b"a*[-b]a*", 0x080000),
        (b"[a-c]c-", 0x000000),
        (b"\\aaa*b", 0x000000),
        (b"\\b\\", 0x000000),
        (b"?\\[?", 0x000080),
        (b"]?c", 0x001000),
        (b"[a-c]a[^a]?*", 0x000000),
        (b"b-b?]*", 0x000000),
        (b"^-a^", 0x000000),
        (b"???b", 0x010010),
        (b"[^a][", 0x000000),
        (b"[^a]?[\\-]*^[", 0x000000),
        (b"[a-c]b-", 0x000000),
        (b"*\\b[b-]", 0x000410),
        (b"^a??[-b]", 0x008000),
        (b"?][^b]", 0x000200),
        (b"*a^", 0x000000),
        (b"*[b", 0x490016),
        (b"a*", 0x3c0000),
        (b"b-]-", 0x000000),
        (b"[]a]*c", 0x000000),
        (b"*-*?", 0x19100c),
        (b"b\\ab*a", 0x000000),
        (b"a[a-c]cb", 0x000000),
        (b"a[[^a][^a]c[a-c]", 0x000000),
        (b"**\\]^\\[", 0x002000),
        (b"-[^b][^a]]*\\", 0x000000),
        (b"^[a-c]", 0x000000),
        (b"*\\b?][^a]\\", 0x000008),
        (b"?*\\b?b", 0x010004),
        (b"?*a", 0x800420),
        (b"b[a-c]", 0x000000),
        (b"b]??b", 0x000000),
        (b"\\a[[", 0x000000),
        (b"^^acc[a-c]", 0x000000),
        (b"??\\-\\\\*", 0x100000),
        (b"[ab]*", 0x7c0000),
        (b"[a-c][^a]\\[[^a]\\", 0x000000),
        (b"\\]?", 0x004000),
        (b"[*b]", 0x400001),
        (b"[^a]c[a-c]", 0x000000),
        (b"c?[^a][a-c][a-c]", 0x000000),
        (b"[^a]^??-", 0x000000),
        (b"?\\", 0x000000),
        (b"\\]??", 0x001000),
        (b"^-b-", 0x000000),
        (b"^b^*", 0x000000),
        (b"[\\\\", 0x000000),
        (b"^?-\\b", 0x010000),
        (b"a^[a-c]", 0x000000),
        (b"\\[b-]a", 0x000000),
        (b"\\\\*?", 0x000600),
        (b"]b^", 0x000000),
        (b"c?[^a]a[", 0x000000),
        (b"[?a]*??\\^a", 0x000020),
        (b"]-*", 0x001000),
        (b"][^a]", 0x004000),
        (b"ca", 0x000000),
        (b"a-a", 0x000000),
        (b"ba[a-c]^ab", 0x000000),
        (b"\\\\^", 0x000000),
        (b"[[b]\\\\??", 0x000100),
        (b"a\\b*?", 0x200000),
        (b"*[[?-]", 0x222bc8),
        (b"]^", 0x004000),
        (b"[\\a]\\ba", 0x000000),
        (b"[?\\?", 0x000000),
        (b"[^a]c?]", 0x000000),
        (b"*\\?b", 0x000000),
        (b"[-b]*?**\\", 0x000008),
        (b"^*?b[^b]", 0x008000),
        (b"b]", 0x000000),
        (b"*a??*a", 0x000020),
        (b"[^b]?[^b]?", 0x210100),
        (b"?*b?", 0x008c10),
        (b"-[b?*", 0x000000),
        (b"[a-c]*\\?*a", 0x000000),
        (b"[^a]^*", 0x804000),
        (b"?[^a]a", 0x800400),
        (b"ba][a-c]", 0x000000),
        (b"??*[?a]", 0xa00ea0),
        (b"\\[^a]a[-", 0x000000),
        (b"bb[b*", 0x000000),
        (b"[a-c]b[^a]", 0x000000),
        (b"-a-[a-c]", 0x000000),
        (b"?*?a*", 0x880420),
        (b"a\\*?[^b]b", 0x080000),
        (b"^a**-", 0x008000),
        (b"b]\\[^a]", 0x000000),
        (b"[a-c]", 0x400000),
        (b"?[-b]c", 0x001000),
        (b"\\b*", 0x400000),
        (b"a?[^a][?-]", 0x200000),
        (b"[^a]?[^b]", 0x801680),
        (b"aa[a-c]a", 0x000000),
        (b"a?-\\*", 0x000000),
        (b"?]?**[\\a]", 0x000000),
        (b"a*-*b", 0x080000),
        (b"b-c?", 0x000000),
        (b"??*bb", 0x000010),
        (b"[^a]^\\", 0x000000),
        (b"[b-]", 0x400000),
        (b"\\^[aa][?a]]-", 0x000000),
        (b"?*[cb]\\b?", 0x000800),
        (b"a[a-c]a", 0x000000),
        (b"-[[-]*[*b][ba]", 0x000000),
        (b"a?[*b]*", 0x200000),
        (b"a*bab", 0x000000),
        (b"[a-c]ab", 0x000000),
        (b"c][^a]ba]", 0x000000),
        (b"b^]\\c", 0x000000),
        (b"[\\[?b]\\", 0x000000),
        (b"?[*-]cb*", 0x040002),
        (b"]^?c", 0x000000),
        (b"[^b]\\*b", 0x000000),
        (b"a*?[^a]*", 0x380000),
        (b"??]--", 0x000000),
        (b"[]-]^", 0x000000),
        (b"[^b]b???[^b]", 0x000008),
        (b"a*-a*", 0x080000),
        (b"]*bb?", 0x000000),
        (b"^[^a][^a]-", 0x000000),
        (b"caa\\", 0x000000),
        (b"\\aa", 0x000000),
        (b"]a[a-c]a?b", 0x000000),
        (b"-b?\\]*?", 0x000008),
        (b"-c\\*]", 0x000000),
        (b"c-", 0x000000),
        (b"?\\a\\?[^a]^a", 0x000020),
        (b"?[\\a]*b", 0x000000),
        (b"b[*^\\", 0x000000),
        (b"?[ba]", 0x000002),
        (b"???a?", 0x080000),
        (b"[]-]?", 0x000000),
        (b"b\\*]?]", 0x000000),
        (b"a[a-c][^a]*", 0x200000),
        (b"[?a]*?[?b]*]", 0x000000),
        (b"**-[\\a][*b]", 0x080000),
        (b"[^b][[?a]", 0x000000),
        (b"*?b*", 0x298c1e),
        (b"?[[-][^a]", 0x004000),
        (b"*a?b-", 0x008000),
        (b"?b*-", 0x000000),
        (b"[a-c][a-c]]aab", 0x000000),
        (b"[*", 0x000001),
        (b"]*?b*", 0x000800),
        (b"ab**", 0x200000),
        (b"*[^a]][", 0x000000),
        (b"[\\?*", 0x000001),
        (b"[^b]???^a", 0x000020),
        (b"ab*?", 0x200000),
        (b"*[bb]?**[\\-]", 0x000000),
        (b"?-", 0x000000),
        (b"[^b]?\\]^\\[", 0x000000),
        (b"[a-c]a*??[aa]", 0x000000),
        (b"*]\\?", 0x000200),
        (b"bc", 0x000000),
        (b"[[a][a-c]?", 0x000000),
        (b"\\^", 0x000000),
        (b"[^a]*bb", 0x000010),
        (b"\\]*c[ba]?", 0x000800),
        (b"?[^b]?]*\\\\", 0x000000),
        (b"bbb[", 0x000000),
        (b"?ba^]", 0x000000),
        (b"[^b]c[c\\", 0x000000),
        (b"a*b", 0x080000),
        (b"??bb", 0x000010),
    ];

    #[test]
    fn agrees_with_redis_keys_on_random_patterns() {
        for &(pattern, mask) in GLOB_CASES {
            let g = Glob::new(pattern, false);
            let ours = GLOB_KEYS.iter().enumerate().filter(|(_, k)| g.matches(k)).fold(0u32, |m, (i, _)| m | 1 << i);
            assert_eq!(ours, mask, "pattern {:?}", core::str::from_utf8(pattern));
        }
    }

    #[test]
    fn pathological_patterns_stay_fast() {
        let s = [b'a'; 4096];
        let mut p = alloc::vec::Vec::new();
        for _ in 0..64 {
            p.extend_from_slice(b"a*");
        }
        p.push(b'b');
        // Exponential with naive backtracking; at most 4096 × 130 steps here.
        assert!(!Glob::new(&p, false).matches(&s));
    }
}
