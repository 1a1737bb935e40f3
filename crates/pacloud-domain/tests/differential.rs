//! Differential test of the request grammar against portage's own
//! validators (portage 3.0.83 from PyPI, driven by
//! tests/oracle/portage_oracle.py in the test venv that scripts/test.sh
//! creates). A seeded generator makes 6,000 categories, packages, versions,
//! USE flags and atoms each — grammar-shaped values and mutations of them
//! with metacharacters, separators, NUL, newlines, non-ASCII and overlong
//! runs — and every verdict must agree with portage, except for the
//! divergence classes documented in tests/oracle/FINDINGS.md, which are
//! counted and printed.

use pacloud_domain::grammar::{Atom, Category, PackageName, UseFlag, Version};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

const PER_KIND: usize = 6000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const NAME_CHARS: &[&str] = &["a", "b", "x", "z", "A", "Q", "0", "1", "9", "_", "-", "+", ".", "@", "-", "a", "e", "o"];
const HOSTILE: &[&str] = &[
    " ", "/", ";", "$", "`", "|", "&", "*", "?", ":", "=", "\n", "\0", "\t", "\\", "'", "\"", "..", "é", "١", "１",
    "ß", "\u{200b}", "~", "!", "[", "]", "(", ")",
];
const VERSION_SUFFIXES: &[&str] = &["_alpha", "_beta", "_pre", "_rc", "_p"];

fn name(r: &mut Rng, max: usize) -> String {
    let len = 1 + r.below(max);
    (0..len).map(|_| r.pick(NAME_CHARS)).collect()
}

fn version(r: &mut Rng) -> String {
    let mut v = String::new();
    let parts = 1 + r.below(4);
    for i in 0..parts {
        if i > 0 {
            v.push('.');
        }
        let bound = if r.chance(10) { 100_000 } else { 30 };
        v.push_str(&r.below(bound).to_string());
        if r.chance(5) {
            v.insert(v.len() - 1, '0');
        }
    }
    if r.chance(20) {
        v.push(char::from(b'a' + r.below(26) as u8));
    }
    for _ in 0..r.below(3) {
        v.push_str(r.pick(VERSION_SUFFIXES));
        if r.chance(60) {
            v.push_str(&r.below(20).to_string());
        }
    }
    if r.chance(30) {
        v.push_str("-r");
        v.push_str(&r.below(12).to_string());
    }
    v
}

/// Mutates a value: insert, replace, delete, duplicate, change case, pad.
fn mutate(r: &mut Rng, s: &str) -> String {
    let mut chars: Vec<String> = s.chars().map(String::from).collect();
    for _ in 0..1 + r.below(2) {
        let at = r.below(chars.len() + 1);
        match r.below(8) {
            0 | 1 => {
                let c = r.pick(HOSTILE).to_owned();
                chars.insert(at, c)
            }
            2 => {
                let c = r.pick(NAME_CHARS).to_owned();
                chars.insert(at, c)
            }
            3 if !chars.is_empty() => {
                chars.remove(at.min(chars.len() - 1));
            }
            4 if !chars.is_empty() => {
                let i = at.min(chars.len() - 1);
                let upper = chars[i].to_uppercase();
                chars[i] = upper;
            }
            5 => chars.push("\n".into()),
            6 => {
                let c = r.pick(&["-", "+", "_", ".", "@", "0"]).to_owned();
                chars.insert(0, c)
            }
            _ => {
                let n = 40 + r.below(120);
                let pad = r.pick(&["a", "1", "-", "_"]).repeat(n);
                chars.insert(at, pad);
            }
        }
    }
    chars.concat()
}

fn package(r: &mut Rng) -> String {
    let mut p = name(r, 12);
    if r.chance(35) {
        p.push('-');
        let tail = if r.chance(70) { version(r) } else { name(r, 4) };
        p.push_str(&tail);
    }
    p
}

fn corpus(kind: &str, r: &mut Rng) -> Vec<String> {
    (0..PER_KIND)
        .map(|_| {
            let base = match kind {
                "category" => {
                    let (a, b) = (name(r, 6), name(r, 6));
                    format!("{a}-{b}")
                }
                "package" => package(r),
                "version" => version(r),
                "use" => {
                    let n = name(r, 14);
                    if r.chance(30) { format!("-{n}") } else { n }
                }
                _ => {
                    let (a, b, p) = (name(r, 5), name(r, 5), package(r));
                    format!("{a}-{b}/{p}")
                }
            };
            if r.chance(45) { mutate(r, &base) } else { base }
        })
        .collect()
}

fn ours(kind: &str, v: &str) -> bool {
    match kind {
        "category" => v.parse::<Category>().is_ok(),
        "package" => v.parse::<PackageName>().is_ok(),
        "version" => v.parse::<Version>().is_ok(),
        "use" => v.parse::<UseFlag>().is_ok(),
        _ => v.parse::<Atom>().is_ok(),
    }
}

/// Why we may say "invalid" where portage says "valid" (FINDINGS.md).
fn documented_divergence(kind: &str, v: &str) -> Option<&'static str> {
    let limit = match kind {
        "category" => 64,
        "package" => 100,
        "version" => 64,
        "use" => 65,
        _ => 165,
    };
    let atom_part_too_long =
        kind == "atom" && v.split_once('/').is_some_and(|(c, p)| c.chars().count() > 64 || p.chars().count() > 100);
    if v.chars().count() > limit || atom_part_too_long {
        return Some("length limit (portage has none)");
    }
    if v.ends_with('\n') && matches!(kind, "version" | "use") {
        return Some("trailing newline (portage's `$` matches before a final \\n)");
    }
    if kind == "version" && v.chars().any(|c| c.is_numeric() && !c.is_ascii()) {
        return Some("non-ASCII digit (portage's version regex lacks re.ASCII)");
    }
    None
}

/// Why we may say "valid" where portage's flag-name check says "invalid".
fn documented_extension(kind: &str, v: &str) -> Option<&'static str> {
    if kind == "use" && v.starts_with('+') && v[1..].parse::<UseFlag>().is_ok() && !v[1..].starts_with(['-', '+']) {
        return Some("`+flag` accepted as an explicit enable (DESIGN: +flag means flag)");
    }
    None
}

fn python() -> PathBuf {
    std::env::var_os("PACLOUD_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python")))
}

#[test]
fn grammar_agrees_with_portage() {
    let mut r = Rng(0x5eed_cafe);
    let kinds = ["category", "package", "version", "use", "atom"];
    let inputs: Vec<(&str, String)> =
        kinds.iter().flat_map(|k| corpus(k, &mut r).into_iter().map(move |v| (*k, v))).collect();

    let oracle = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/oracle/portage_oracle.py");
    let py = python();
    let mut child =
        Command::new(&py).arg(oracle).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap_or_else(|e| {
            panic!("cannot run the portage oracle with {py:?} (scripts/test.sh creates the venv): {e}")
        });
    let mut stdin = child.stdin.take().unwrap();
    let lines: Vec<String> =
        inputs.iter().map(|(k, v)| serde_json::json!({"kind": k, "value": v}).to_string()).collect();
    let writer = std::thread::spawn(move || {
        for l in lines {
            writeln!(stdin, "{l}").unwrap();
        }
    });
    let verdicts: Vec<bool> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l.unwrap()).unwrap();
            v["valid"].as_bool().unwrap()
        })
        .collect();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success(), "oracle exited cleanly");
    assert_eq!(verdicts.len(), inputs.len(), "one verdict per input");

    let mut agree = 0usize;
    let mut valid = BTreeMap::<&str, usize>::new();
    let mut classes = BTreeMap::<&str, usize>::new();
    let mut unexplained = Vec::new();
    for ((kind, value), portage) in inputs.iter().zip(&verdicts) {
        let us = ours(kind, value);
        if us {
            *valid.entry(kind).or_default() += 1;
        }
        if us == *portage {
            agree += 1;
            continue;
        }
        let why = if *portage { documented_divergence(kind, value) } else { documented_extension(kind, value) };
        match why {
            Some(c) => *classes.entry(c).or_default() += 1,
            None => unexplained.push(format!("{kind} {value:?}: ours={us} portage={portage}")),
        }
    }
    println!("differential: {} inputs, {agree} agree; valid per kind (ours): {valid:?}", inputs.len());
    for (c, n) in &classes {
        println!("  documented divergence: {n:5} x {c}");
    }
    assert!(
        unexplained.is_empty(),
        "{} unexplained disagreements, e.g.:\n{}",
        unexplained.len(),
        unexplained[..unexplained.len().min(20)].join("\n")
    );
    for k in kinds {
        let n = valid.get(k).copied().unwrap_or(0);
        assert!(
            n > PER_KIND / 10 && n < PER_KIND * 9 / 10,
            "{k}: corpus is balanced between valid and invalid ({n} valid)"
        );
    }
}
