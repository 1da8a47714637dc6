//! Rates and sizes as users write them: `100Mbit`, `1.5G`, `64KiB`, or plain numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A rate in bits per second. Written `250M`, `1.5Gbit`, `800kbps` or as a number of bits/s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "NumOrText", into = "String")]
pub struct BitRate(pub u64);

/// A size in bytes. Written `64KiB`, `1MB`, `9000` (K = 1000, Ki = 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "NumOrText", into = "String")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(u64),
    Text(String),
}

/// A rate or size that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// no number
    #[error("'{0}' does not start with a number")]
    NotANumber(String),
    /// too big
    #[error("'{0}' is out of range")]
    OutOfRange(String),
    /// unknown rate unit
    #[error("'{text}': unknown rate unit '{unit}' (write bits per second, e.g. 800k, 100Mbit, 1.5G)")]
    RateUnit {
        /// What the user wrote.
        text: String,
        /// The unit in it.
        unit: String,
    },
    /// unknown size unit
    #[error("'{text}': unknown size unit '{unit}' (write bytes, e.g. 9000, 64KiB, 1MB, 1TiB)")]
    SizeUnit {
        /// What the user wrote.
        text: String,
        /// The unit in it.
        unit: String,
    },
}

/// Splits `1.5Gbit` into 1.5 and `Gbit`.
fn split_number(s: &str) -> Result<(f64, &str), UnitError> {
    let s = s.trim();
    let end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let v: f64 = num.parse().map_err(|_| UnitError::NotANumber(s.to_string()))?;
    Ok((v, unit.trim()))
}

fn scaled(v: f64, mult: f64, s: &str) -> Result<u64, UnitError> {
    let x = (v * mult).round();
    if !(0.0..1.8e19).contains(&x) {
        return Err(UnitError::OutOfRange(s.to_string()));
    }
    Ok(x as u64)
}

impl FromStr for BitRate {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let (v, unit) = split_number(s)?;
        let prefix = unit.trim_end_matches("bps").trim_end_matches("bit").trim_end_matches("b");
        let mult = match prefix {
            "" => 1.0,
            "k" | "K" => 1e3,
            "m" | "M" => 1e6,
            "g" | "G" => 1e9,
            "t" | "T" => 1e12,
            _ => return Err(UnitError::RateUnit { text: s.to_string(), unit: unit.to_string() }),
        };
        scaled(v, mult, s).map(BitRate)
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let (v, unit) = split_number(s)?;
        let mult = match unit.trim_end_matches('B') {
            "" => 1.0,
            "k" | "K" => 1e3,
            "Ki" | "ki" => 1024.0,
            "M" => 1e6,
            "Mi" => 1024.0 * 1024.0,
            "G" => 1e9,
            "Gi" => 1024.0 * 1024.0 * 1024.0,
            "T" => 1e12,
            "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            _ => return Err(UnitError::SizeUnit { text: s.to_string(), unit: unit.to_string() }),
        };
        scaled(v, mult, s).map(ByteSize)
    }
}

/// Writes `v` with the largest of `units` (value, name) that divides it exactly.
fn fmt_units(f: &mut fmt::Formatter<'_>, v: u64, units: &[(u64, &str)], base: &str) -> fmt::Result {
    for &(m, name) in units {
        if v >= m && v.is_multiple_of(m) {
            return write!(f, "{}{name}", v / m);
        }
    }
    write!(f, "{v}{base}")
}

impl fmt::Display for BitRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_units(f, self.0, &[(1_000_000_000, "Gbit"), (1_000_000, "Mbit"), (1_000, "kbit")], "bit")
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_units(
            f,
            self.0,
            &[(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"), (1_000, "KB")],
            "",
        )
    }
}

impl TryFrom<NumOrText> for BitRate {
    type Error = UnitError;
    fn try_from(v: NumOrText) -> Result<Self, UnitError> {
        match v {
            NumOrText::Num(n) => Ok(BitRate(n)),
            NumOrText::Text(s) => s.parse(),
        }
    }
}

impl TryFrom<NumOrText> for ByteSize {
    type Error = UnitError;
    fn try_from(v: NumOrText) -> Result<Self, UnitError> {
        match v {
            NumOrText::Num(n) => Ok(ByteSize(n)),
            NumOrText::Text(s) => s.parse(),
        }
    }
}

impl From<BitRate> for String {
    fn from(r: BitRate) -> String {
        r.to_string()
    }
}

impl From<ByteSize> for String {
    fn from(b: ByteSize) -> String {
        b.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rates_parse_in_bits() {
        assert_eq!("100Mbit".parse::<BitRate>().unwrap(), BitRate(100_000_000));
        assert_eq!("1.5G".parse::<BitRate>().unwrap(), BitRate(1_500_000_000));
        assert_eq!("800kbps".parse::<BitRate>().unwrap(), BitRate(800_000));
        assert_eq!("12345".parse::<BitRate>().unwrap(), BitRate(12345));
        let e = "10 furlongs".parse::<BitRate>().unwrap_err();
        assert!(e.to_string().contains("unknown rate unit"), "{e}");
        assert!("fast".parse::<BitRate>().unwrap_err().to_string().contains("number"));
    }

    #[test]
    fn test_sizes_parse_in_bytes() {
        assert_eq!("64KiB".parse::<ByteSize>().unwrap(), ByteSize(65536));
        assert_eq!("64KB".parse::<ByteSize>().unwrap(), ByteSize(64_000));
        assert_eq!("1MiB".parse::<ByteSize>().unwrap(), ByteSize(1 << 20));
        assert_eq!("9000".parse::<ByteSize>().unwrap(), ByteSize(9000));
        assert_eq!("1TiB".parse::<ByteSize>().unwrap(), ByteSize(1 << 40));
        assert!("9000 bits".parse::<ByteSize>().is_err());
    }

    #[test]
    fn test_display_round_trips() {
        for r in [BitRate(100_000_000), BitRate(1_500_000_000), BitRate(333_333)] {
            assert_eq!(r.to_string().parse::<BitRate>().unwrap(), r);
        }
        for b in [ByteSize(65536), ByteSize(64_000), ByteSize(1518)] {
            assert_eq!(b.to_string().parse::<ByteSize>().unwrap(), b);
        }
    }

    #[test]
    fn test_toml_takes_numbers_or_text() {
        #[derive(Deserialize)]
        struct T {
            a: BitRate,
            b: ByteSize,
        }
        let t: T = toml::from_str("a = \"10M\"\nb = 1500").unwrap();
        assert_eq!((t.a, t.b), (BitRate(10_000_000), ByteSize(1500)));
    }
}
