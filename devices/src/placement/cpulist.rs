//! CPU (and NUMA node) lists in the kernel's format: `0-3,8,10-11`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The highest CPU or node number a list may name; far above any host, low enough to refuse nonsense early.
const MAX_ID: u32 = 8191;

/// A set of CPU or node numbers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CpuList(BTreeSet<u32>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CPU list {value:?}: {reason}; expected numbers and ranges such as 0-3,8")]
pub struct CpuListError {
    pub value: String,
    pub reason: String,
}

impl CpuList {
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    pub fn contains(&self, id: u32) -> bool {
        self.0.contains(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The ranges of consecutive ids, for QEMU options that take `a-b` (one option per range).
    pub fn ranges(&self) -> Vec<(u32, u32)> {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for id in self.ids() {
            match ranges.last_mut() {
                Some((_, end)) if *end + 1 == id => *end = id,
                _ => ranges.push((id, id)),
            }
        }
        ranges
    }
}

impl FromIterator<u32> for CpuList {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl FromStr for CpuList {
    type Err = CpuListError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| CpuListError { value: value.to_owned(), reason };
        let mut ids = BTreeSet::new();
        for part in value.trim().split(',') {
            let number = |text: &str| -> Result<u32, CpuListError> {
                let n: u32 = text.trim().parse().map_err(|_| err(format!("{text:?} is not a number")))?;
                if n > MAX_ID {
                    return Err(err(format!("{n} is above {MAX_ID}")));
                }
                Ok(n)
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (number(a)?, number(b)?);
                    if a > b {
                        return Err(err(format!("the range {a}-{b} runs backwards")));
                    }
                    ids.extend(a..=b);
                }
                None => {
                    ids.insert(number(part)?);
                }
            }
        }
        Ok(Self(ids))
    }
}

impl TryFrom<String> for CpuList {
    type Error = CpuListError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<CpuList> for String {
    fn from(list: CpuList) -> Self {
        list.to_string()
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> =
            self.ranges().into_iter().map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_kernel_format() {
        let list: CpuList = "0-3, 8,10-11,2".parse().unwrap();
        assert_eq!(list.ids().collect::<Vec<_>>(), [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(list.to_string(), "0-3,8,10-11");
        assert_eq!(list.ranges(), [(0, 3), (8, 8), (10, 11)]);
        for (bad, reason) in
            [("", "\"\" is not a number"), ("3-1", "runs backwards"), ("0,x", "\"x\""), ("9999", "above")]
        {
            let e = bad.parse::<CpuList>().unwrap_err();
            assert!(e.reason.contains(reason), "{bad}: {e}");
        }
    }
}
