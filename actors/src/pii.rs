//! Personal data never reaches a log unmasked. [`Pii`] is the one redaction type: wrap an
//! identity, display name, IP address or phone number in it before formatting, and only the
//! masked form is written:
//!
//! - identities: a salted hash prefix (`id:3fa9c21b07d4`), equal on every node sharing the salt,
//!   so one viewer's events can be followed without knowing who it is;
//! - display names: Hangul names romanized (Revised Romanization, customary surname spellings)
//!   and masked, `김민수` → `Kim*Su`; other names keep the first letter of each word;
//! - IPv4 addresses: their /24 (`203.0.113.0`); IPv6: their /48 (`2001:db8:1::`);
//! - Korean mobile numbers: the middle group masked (`010-****-5678`).

use sha2::{Digest, Sha256};
use std::fmt;
use std::net::IpAddr;
use std::sync::OnceLock;

static IDENTITY_SALT: OnceLock<Vec<u8>> = OnceLock::new();

/// Sets the salt of identity hashes, once per process (later calls are ignored). Nodes of one
/// cluster derive it from their shared cluster secret, so hashes match across nodes.
pub fn set_identity_salt(salt: &[u8]) {
    let _ = IDENTITY_SALT.set(salt.to_vec());
}

/// A piece of personal data; its `Display` is the masked form.
#[derive(Debug, Clone, Copy)]
pub enum Pii<'a> {
    Identity(&'a str),
    Name(&'a str),
    Ip(IpAddr),
    Phone(&'a str),
}

impl fmt::Display for Pii<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Pii::Identity(identity) => f.write_str(&hash_identity(identity)),
            Pii::Name(name) => f.write_str(&mask_name(name)),
            Pii::Ip(ip) => f.write_str(&mask_ip(ip)),
            Pii::Phone(phone) => f.write_str(&mask_phone(phone)),
        }
    }
}

pub fn hash_identity(identity: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(IDENTITY_SALT.get().map(Vec::as_slice).unwrap_or(b"mediamesh"));
    hasher.update([0u8]);
    hasher.update(identity.as_bytes());
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("id:{hex}")
}

pub fn mask_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0")
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0).to_string()
        }
    }
}

/// Masks the middle group of a Korean mobile number (`010-1234-5678`, `01012345678`,
/// `+82-10-1234-5678`); anything else that looks like a number keeps only its last four digits.
pub fn mask_phone(phone: &str) -> String {
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    let (prefix, national) = match digits.strip_prefix("82") {
        Some(rest) if phone.trim_start().starts_with('+') => ("+82-", format!("0{rest}")),
        _ => ("", digits.clone()),
    };
    if matches!(national.len(), 10 | 11) && national.starts_with("01") {
        let carrier = if prefix.is_empty() {
            &national[..3]
        } else {
            &national[1..3]
        };
        let middle = "*".repeat(national.len() - 7); // 3 or 4 digits
        return format!("{prefix}{carrier}-{middle}-{}", &national[national.len() - 4..]);
    }
    let tail = &digits[digits.len().saturating_sub(4)..];
    format!("****{tail}")
}

const HANGUL_FIRST: u32 = 0xAC00;
const HANGUL_LAST: u32 = 0xD7A3;
const INITIALS: [&str; 19] = [
    "g", "kk", "n", "d", "tt", "r", "m", "b", "pp", "s", "ss", "", "j", "jj", "ch", "k", "t", "p", "h",
];
const MEDIALS: [&str; 21] = [
    "a", "ae", "ya", "yae", "eo", "e", "yeo", "ye", "o", "wa", "wae", "oe", "yo", "u", "wo", "we", "wi", "yu", "eu",
    "ui", "i",
];
const FINALS: [&str; 28] = [
    "", "k", "k", "k", "n", "n", "n", "t", "l", "k", "m", "l", "l", "l", "p", "l", "m", "p", "p", "t", "t", "ng", "t",
    "t", "k", "t", "p", "t",
];
/// Customary spellings of common surnames, which differ from plain Revised Romanization.
const SURNAMES: [(char, &str); 40] = [
    ('김', "Kim"),
    ('이', "Lee"),
    ('박', "Park"),
    ('최', "Choi"),
    ('정', "Jeong"),
    ('강', "Kang"),
    ('조', "Cho"),
    ('윤', "Yoon"),
    ('장', "Jang"),
    ('임', "Lim"),
    ('한', "Han"),
    ('오', "Oh"),
    ('서', "Seo"),
    ('신', "Shin"),
    ('권', "Kwon"),
    ('황', "Hwang"),
    ('안', "Ahn"),
    ('송', "Song"),
    ('류', "Ryu"),
    ('전', "Jeon"),
    ('홍', "Hong"),
    ('고', "Ko"),
    ('문', "Moon"),
    ('양', "Yang"),
    ('손', "Son"),
    ('배', "Bae"),
    ('백', "Baek"),
    ('허', "Heo"),
    ('노', "Noh"),
    ('심', "Shim"),
    ('하', "Ha"),
    ('곽', "Kwak"),
    ('성', "Sung"),
    ('차', "Cha"),
    ('주', "Joo"),
    ('우', "Woo"),
    ('구', "Koo"),
    ('유', "Yoo"),
    ('나', "Na"),
    ('민', "Min"),
];

fn is_hangul_syllable(c: char) -> bool {
    (HANGUL_FIRST..=HANGUL_LAST).contains(&(c as u32))
}

/// Revised Romanization of one Hangul syllable, capitalized (`수` → `Su`).
pub fn romanize_syllable(c: char) -> Option<String> {
    if !is_hangul_syllable(c) {
        return None;
    }
    let index = c as u32 - HANGUL_FIRST;
    let initial = INITIALS[(index / (21 * 28)) as usize];
    let medial = MEDIALS[(index % (21 * 28) / 28) as usize];
    let last = FINALS[(index % 28) as usize];
    let plain = format!("{initial}{medial}{last}");
    let mut chars = plain.chars();
    let first = chars.next()?;
    Some(first.to_ascii_uppercase().to_string() + chars.as_str())
}

/// The masked form of a display name: see the module docs. A name mixing words (a Hangul name
/// with a Latin nickname, or with a phone number) is masked word by word.
pub fn mask_name(name: &str) -> String {
    let syllables: Vec<char> = name.chars().filter(|c| !c.is_whitespace()).collect();
    if let Some(masked) = mask_hangul(&syllables) {
        return masked;
    }
    name.split_whitespace()
        .map(|word| {
            let chars: Vec<char> = word.chars().collect();
            if looks_like_phone(word) {
                return mask_phone(word);
            }
            if let Some(masked) = mask_hangul(&chars) {
                return masked;
            }
            match chars.split_first() {
                Some((first, rest)) if first.is_alphanumeric() => first.to_string() + &"*".repeat(rest.len()),
                _ => "*".repeat(chars.len()),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `text` contains Hangul: syllables or jamo (conjoining or compatibility).
pub fn has_hangul(text: &str) -> bool {
    text.chars().any(|c| {
        is_hangul_syllable(c) || ('\u{1100}'..='\u{11FF}').contains(&c) || ('\u{3130}'..='\u{318F}').contains(&c)
    })
}

/// A name as the store, the admin API and the dashboard keep and show it: with Hangul in it,
/// only its masked romanization (`김민수` → `Kim*Su`) unless the operator turned masking off;
/// other names as given. Logs always use [`Pii::Name`], masked whatever this says.
pub fn shown_name(name: &str, mask: bool) -> String {
    if mask && has_hangul(name) {
        mask_name(name)
    } else {
        name.to_string()
    }
}

/// A word of digits and separators with at least nine digits.
fn looks_like_phone(word: &str) -> bool {
    word.chars().all(|c| c.is_ascii_digit() || "+-(). ".contains(c))
        && word.chars().filter(char::is_ascii_digit).count() >= 9
}

/// Romanized surname, masked middle, romanized last syllable; `None` unless all are Hangul.
fn mask_hangul(syllables: &[char]) -> Option<String> {
    if syllables.is_empty() || !syllables.iter().all(|&c| is_hangul_syllable(c)) {
        return None;
    }
    let surname = SURNAMES
        .iter()
        .find(|(s, _)| *s == syllables[0])
        .map(|(_, r)| r.to_string())
        .or_else(|| romanize_syllable(syllables[0]))
        .unwrap_or_default();
    Some(match syllables.len() {
        1 => surname,
        2 => format!("{surname}*"),
        n => {
            let last = romanize_syllable(syllables[n - 1]).unwrap_or_default();
            format!("{surname}{}{last}", "*".repeat(n - 2))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hangul_names() {
        assert_eq!(mask_name("김민수"), "Kim*Su");
        assert_eq!(shown_name("김민수", true), "Kim*Su");
        assert_eq!(shown_name("김민수", false), "김민수");
        assert_eq!(
            shown_name("Minsu Kim", true),
            "Minsu Kim",
            "only names with Hangul are masked"
        );
        assert_eq!(shown_name("민수 Kim", true), "Min* K**");
        assert!(!shown_name("ㅁㅅ", true).contains('ㅅ'), "jamo count as Hangul");
        assert_eq!(mask_name("이서연"), "Lee*Yeon");
        assert_eq!(mask_name("박지"), "Park*");
        assert_eq!(mask_name("남궁민수"), "Nam**Su");
        assert_eq!(romanize_syllable('한'), Some("Han".into()));
        assert_eq!(romanize_syllable('률'), Some("Ryul".into()));
        assert_eq!(mask_name("John Smith"), "J*** S****");
        assert!(!mask_name("김민수").contains('김'));
        assert_eq!(mask_name("김민수 010-1234-5678"), "Kim*Su 010-****-5678");
        assert_eq!(mask_name("Minsu 김민수"), "M**** Kim*Su");
        assert_eq!(mask_name("01012345678"), "010-****-5678");
    }

    #[test]
    fn phones_and_ips() {
        assert_eq!(mask_phone("010-1234-5678"), "010-****-5678");
        assert_eq!(mask_phone("01012345678"), "010-****-5678");
        assert_eq!(mask_phone("+82-10-1234-5678"), "+82-10-****-5678");
        assert_eq!(mask_phone("011-123-4567"), "011-***-4567");
        assert_eq!(mask_phone("02-555-1234"), "****1234");
        assert_eq!(mask_ip("203.0.113.77".parse().expect("ip")), "203.0.113.0");
        assert_eq!(mask_ip("2001:db8:1:2:3:4:5:6".parse().expect("ip")), "2001:db8:1::");
    }

    #[test]
    fn identities_hash_stably_and_hide_the_name() {
        let a = Pii::Identity("alice@example.com").to_string();
        assert_eq!(a, Pii::Identity("alice@example.com").to_string());
        assert_ne!(a, Pii::Identity("bob").to_string());
        assert!(a.starts_with("id:") && a.len() == 15 && !a.contains("alice"), "{a}");
    }
}
