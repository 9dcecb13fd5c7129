//! A manifest sent as its difference from the one a host already has.
//!
//! A host keeps the manifest of the release it runs; the next release
//! shares most of its lines. The host sends a fingerprint of each of those
//! lines ([`fingerprints`], 6 bytes a line, a tenth of the manifest); the
//! coordinator answers with the new manifest written as runs of the host's
//! lines and the lines it lacks ([`encode`]); the host rebuilds the text
//! ([`apply`]) and keeps it only if its digest is the one the coordinator
//! named, so a fingerprint collision or a base that changed meanwhile
//! costs one resend of the whole manifest, never a wrong one.
//!
//! The delta is text, one operation a line: `= START COUNT` copies COUNT
//! lines of the base from its line START (entries counted from 0 after the
//! version line), `+ LINE` is a line of the new manifest as it is.

use std::collections::HashMap;

/// Bytes of a line's fingerprint: a false match among a million lines
/// against a million is a few in a thousand deploys, each caught by the
/// digest and resent whole.
pub const FINGERPRINT: usize = 6;

/// The manifest's lines after its version line.
fn entry_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().skip(1)
}

fn fingerprint(line: &str) -> [u8; FINGERPRINT] {
    let h = blake3::hash(line.as_bytes());
    let mut f = [0u8; FINGERPRINT];
    f.copy_from_slice(&h.as_bytes()[..FINGERPRINT]);
    f
}

/// Each entry line's fingerprint, in order.
pub fn fingerprints(text: &str) -> Vec<u8> {
    entry_lines(text).flat_map(fingerprint).collect()
}

/// The new manifest `text` as a delta against the base whose lines have
/// `base` fingerprints.
pub fn encode(text: &str, base: &[u8]) -> String {
    let mut at: HashMap<[u8; FINGERPRINT], usize> = HashMap::new();
    for (i, f) in base.chunks_exact(FINGERPRINT).enumerate() {
        at.entry(f.try_into().expect("chunk size")).or_insert(i);
    }
    let mut out = String::new();
    let mut run: Option<(usize, usize)> = None;
    let flush = |out: &mut String, run: &mut Option<(usize, usize)>| {
        if let Some((start, count)) = run.take() {
            out.push_str(&format!("= {start} {count}\n"));
        }
    };
    for line in entry_lines(text) {
        match at.get(&fingerprint(line)) {
            Some(&j) => match &mut run {
                Some((start, count)) if *start + *count == j => *count += 1,
                _ => {
                    flush(&mut out, &mut run);
                    run = Some((j, 1));
                }
            },
            None => {
                flush(&mut out, &mut run);
                out.push_str("+ ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    flush(&mut out, &mut run);
    out
}

/// The manifest text `delta` describes against `base` (a manifest's
/// text); the error says which operation is malformed.
pub fn apply(base: &str, delta: &str) -> Result<String, String> {
    let mut lines = base.lines();
    let version = lines.next().ok_or("the base manifest is empty")?;
    let base: Vec<&str> = lines.collect();
    let mut out = String::with_capacity(delta.len() + base.len() * 100);
    out.push_str(version);
    out.push('\n');
    for (n, op) in delta.lines().enumerate() {
        let bad = || format!("delta line {}: malformed {op:?}", n + 1);
        if let Some(line) = op.strip_prefix("+ ") {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let copy = op.strip_prefix("= ").and_then(|r| r.split_once(' '));
        let (start, count) = copy.ok_or_else(bad)?;
        let start: usize = start.parse().map_err(|_| bad())?;
        let count: usize = count.parse().map_err(|_| bad())?;
        let end = start.checked_add(count).ok_or_else(bad)?;
        let run = base.get(start..end).ok_or_else(|| {
            format!(
                "delta line {}: lines {start}..{end} of a base of {}",
                n + 1,
                base.len()
            )
        })?;
        for line in run {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(lines: &[String]) -> String {
        let mut s = String::from("dream-manifest 1\n");
        for l in lines {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// Random edits (changed, added, removed, moved lines) of a random
    /// manifest rebuild exactly, and the delta of a 1% change is small.
    #[test]
    fn a_delta_rebuilds_the_new_manifest_exactly_and_is_small() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..20 {
            let n = 1 + rand(3000);
            let old: Vec<String> = (0..n)
                .map(|i| format!("f 644 {} {:064x} dir/file {i} ü", rand(9999), rand(1 << 30)))
                .collect();
            let mut new = old.clone();
            for _ in 0..1 + rand(n / 20 + 1) {
                let at = rand(new.len().max(1));
                match rand(4) {
                    0 if !new.is_empty() => {
                        new.remove(at);
                    }
                    1 => new.insert(at, format!("f 600 1 {:064x} new {round}", rand(1 << 30))),
                    2 if !new.is_empty() => {
                        let l = new.remove(at);
                        let to = rand(new.len() + 1);
                        new.insert(to, l);
                    }
                    _ if !new.is_empty() => new[at] = format!("l target changed {at}"),
                    _ => {}
                }
            }
            let (base, text) = (manifest(&old), manifest(&new));
            let delta = encode(&text, &fingerprints(&base));
            assert_eq!(apply(&base, &delta).unwrap(), text, "round {round}");
        }
        let old: Vec<String> = (0..10_000)
            .map(|i| format!("f 644 1000 {:064x} public/assets/file-{i}.js", i * 7919))
            .collect();
        let mut new = old.clone();
        for i in (0..10_000).step_by(100) {
            new[i] = format!("f 644 1000 {:064x} public/assets/file-{i}.js", i + 1);
        }
        let (base, text) = (manifest(&old), manifest(&new));
        let delta = encode(&text, &fingerprints(&base));
        assert_eq!(apply(&base, &delta).unwrap(), text);
        assert!(
            delta.len() * 20 < text.len(),
            "a 1% change: delta {} bytes of a {}-byte manifest",
            delta.len(),
            text.len()
        );
        assert_eq!(fingerprints(&base).len(), 10_000 * FINGERPRINT);
    }

    /// A delta that reaches outside its base, or is not one, is refused
    /// with the line named; nothing panics.
    #[test]
    fn a_malformed_delta_is_refused_naming_its_line() {
        let base = "dream-manifest 1\nd 755 a\nd 755 b\n";
        for (delta, want) in [
            ("= 1 5\n", "delta line 1: lines 1..6 of a base of 2"),
            ("= 0 1\n= x 1\n", "delta line 2: malformed"),
            ("+ d 755 c\n- 0\n", "delta line 2: malformed"),
            (&format!("= {} 2\n", usize::MAX), "delta line 1: malformed"),
        ] {
            let e = apply(base, delta).unwrap_err();
            assert!(e.contains(want), "{delta:?}: {e}");
        }
        assert!(apply("", "= 0 0\n").is_err());
        assert_eq!(apply(base, "").unwrap(), "dream-manifest 1\n");
    }
}
