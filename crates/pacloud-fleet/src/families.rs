//! CPU families and the instance types that have them (AWS-EB's idea: a
//! target asks for a CPU family, and every instance family that implements
//! it is a candidate, which widens the spot pools a fleet can draw from).

use std::fmt;
use std::str::FromStr;

/// The CPU family a build target needs; tagged on fleets and instances as
/// `pacloud:cpu-family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum CpuFamily {
    #[serde(rename = "x86-64")]
    X86_64,
    #[serde(rename = "x86-64-v3")]
    X86_64V3,
    #[serde(rename = "arm64")]
    Arm64,
}

impl CpuFamily {
    pub const ALL: [CpuFamily; 3] = [CpuFamily::X86_64, CpuFamily::X86_64V3, CpuFamily::Arm64];

    /// The tag value.
    pub fn as_str(self) -> &'static str {
        match self {
            CpuFamily::X86_64 => "x86-64",
            CpuFamily::X86_64V3 => "x86-64-v3",
            CpuFamily::Arm64 => "arm64",
        }
    }

    /// Hibernation-capable 4-vCPU instance types that run this family
    /// (AWS-EB: a CPU family maps to every instance family that has it).
    /// x86-64-v3 needs AVX2, BMI2, FMA, MOVBE: Skylake and later, Zen 2 and
    /// later, which every listed x86 family has; x86-64 therefore shares the
    /// list. All of C5/C6/M5/M6/C7g/M7g support hibernation (EC2 User Guide,
    /// "Prerequisites for EC2 instance hibernation").
    pub fn instance_types(self) -> &'static [&'static str] {
        match self {
            CpuFamily::X86_64 | CpuFamily::X86_64V3 => {
                &["c6i.xlarge", "c6a.xlarge", "c5.xlarge", "c7i.xlarge", "m6i.xlarge", "m6a.xlarge", "m5.xlarge"]
            }
            CpuFamily::Arm64 => &["c7g.xlarge", "c6g.xlarge", "m7g.xlarge", "m6g.xlarge"],
        }
    }
}

impl fmt::Display for CpuFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown CPU family name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown CPU family {0:?} (expected x86-64, x86-64-v3 or arm64)")]
pub struct UnknownFamily(pub String);

impl FromStr for CpuFamily {
    type Err = UnknownFamily;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86-64" => Ok(CpuFamily::X86_64),
            "x86-64-v3" => Ok(CpuFamily::X86_64V3),
            "arm64" => Ok(CpuFamily::Arm64),
            other => Err(UnknownFamily(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_named() {
        for f in CpuFamily::ALL {
            assert_eq!(f.as_str().parse::<CpuFamily>().unwrap(), f);
            assert!(!f.instance_types().is_empty());
        }
        let e = "riscv".parse::<CpuFamily>().unwrap_err();
        assert!(e.to_string().contains("riscv"));
    }

    #[test]
    fn arm_and_x86_types_do_not_mix() {
        assert!(CpuFamily::Arm64.instance_types().iter().all(|t| t.contains('g')));
        assert!(CpuFamily::X86_64.instance_types().iter().all(|t| !t.starts_with("c7g")));
    }
}
