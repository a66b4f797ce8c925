//! The schema the double implements: `deploy/fauna/schema.fsl`, whose collections, roles and
//! functions it recognises by the SHA-256 of their text, as it recognises the broker's queries.
//!
//! The double's roles and the two functions the broker calls are written by hand in `txn`
//! from the schema's text, so a change to that text must reach the double too. The double
//! checks the schema file when it starts and refuses to start while an item's text is not the
//! one it implements, naming the item and its new hash: update [`KNOWN_SCHEMA`] once `txn`
//! follows the change.

use super::query::hex_digest;

/// The schema file, as pushed to a real database.
const SCHEMA: &str = include_str!("../../../deploy/fauna/schema.fsl");

/// Each item of the schema the double implements, by kind and name, with the SHA-256 (hex) of
/// its text (from its annotations to its closing brace, comment lines left out).
pub const KNOWN_SCHEMA: &[(&str, &str)] = &[
    (
        "collection Account",
        "736f533a915e30062fa3649ff4cb2ad8170311acae807a2f49f5b8c4bbafca9a",
    ),
    (
        "collection Movie",
        "a1523062ab7c0dd098a6b0a20c7dbdbc1b390ae15d2214bf97e8f3efd7f5a409",
    ),
    (
        "role access",
        "bf7be1df2fda61e29acafdf3936425cac1f9560dc3bfe1af14f0ae20bb25fe41",
    ),
    (
        "role refresher",
        "7dac8517a0f1b55233ad7f7be4e3e4e73e76d7a685b67316f15e3cb9549b97bb",
    ),
    (
        "collection BrokerPolicy",
        "27848a194f3a3fd6a8034264467a10a8ef5b3ba19e129c13c99cb68bed26754e",
    ),
    (
        "collection RotationAttempt",
        "9f66825656848ee290ebfe75f75b7a208d52860e8c5a46a48c7c641c258761dc",
    ),
    (
        "collection Replay",
        "3c62a3b1609bbccc866474cb99e70bbaaddc244719daf61e9cd21d59602e36a1",
    ),
    (
        "collection Rotation",
        "a5b6b3c953921ea2a68b6272489c0607d1c9b1e46187b90972cbe9e0039ffb8e",
    ),
    (
        "function rotateRefreshToken",
        "ed76059e98d17115a411783554160a5a1c5f9e74195d1798b8fb0a18d0be10ac",
    ),
    (
        "function revokeCurrentToken",
        "3b7afb5091abcd21bb65c85f03f3f81c76a93bcaf41db89e3200c8d07015308f",
    ),
];

/// Splits FSL into its top-level items: (kind and name, text). An item is a line that starts
/// with `collection`, `role` or `function`, with the annotation lines (`@role(server)`) just
/// above it, up to the brace that closes its first one. Comment lines are left out, so a
/// comment's wording is not a change.
pub(super) fn items(schema: &str) -> Vec<(String, String)> {
    let mut items = Vec::new();
    let mut annotations: Vec<&str> = Vec::new();
    let mut current: Option<(String, Vec<&str>, i32)> = None;
    for line in schema.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("//") || trimmed.is_empty() {
            continue;
        }
        if let Some((_, lines, depth)) = &mut current {
            lines.push(line);
            *depth += braces(line);
            if *depth <= 0 {
                let (name, lines, _) = current.take().expect("an item");
                items.push((name, lines.join("\n")));
            }
            continue;
        }
        if trimmed.starts_with('@') {
            annotations.push(line);
            continue;
        }
        let mut words = trimmed.split(|c: char| c.is_whitespace() || c == '(' || c == '{');
        let (Some(kind), Some(name)) = (words.next(), words.find(|w| !w.is_empty())) else {
            annotations.clear();
            continue;
        };
        if !matches!(kind, "collection" | "role" | "function") {
            annotations.clear();
            continue;
        }
        let mut lines = std::mem::take(&mut annotations);
        lines.push(line);
        let depth = braces(line);
        let name = format!("{kind} {name}");
        if depth <= 0 && line.contains('}') {
            items.push((name, lines.join("\n")));
        } else {
            current = Some((name, lines, depth));
        }
    }
    items
}

/// Opening minus closing braces on a line, outside string literals.
fn braces(line: &str) -> i32 {
    let mut depth = 0;
    let mut in_string = false;
    for c in line.chars() {
        match c {
            '"' => in_string = !in_string,
            '{' if !in_string => depth += 1,
            '}' if !in_string => depth -= 1,
            _ => {}
        }
    }
    depth
}

/// Checks the schema file against [`KNOWN_SCHEMA`]: `Err` names every item that is new,
/// gone or changed, with its hash now.
pub(super) fn verify() -> Result<(), String> {
    verify_text(SCHEMA)
}

fn verify_text(schema: &str) -> Result<(), String> {
    let found: Vec<(String, String)> = items(schema)
        .into_iter()
        .map(|(name, text)| (name, hex_digest(text.as_bytes())))
        .collect();
    let mut problems = Vec::new();
    for (name, hash) in &found {
        match KNOWN_SCHEMA.iter().find(|(known, _)| known == name) {
            None => problems.push(format!("{name} is new (sha256 {hash})")),
            Some((_, known)) if known != hash => {
                problems.push(format!("{name} changed (sha256 {hash})"));
            }
            Some(_) => {}
        }
    }
    for (name, _) in KNOWN_SCHEMA {
        if !found.iter().any(|(f, _)| f == name) {
            problems.push(format!("{name} is gone"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "deploy/fauna/schema.fsl is not the schema the Fauna double implements: {}; make \
             the double follow it (tests/src/fauna/txn.rs), then update KNOWN_SCHEMA \
             (tests/src/fauna/schema.rs)",
            problems.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_file_is_the_one_the_double_implements() {
        verify().unwrap_or_else(|problem| panic!("{problem}"));
    }

    #[test]
    fn items_run_from_their_annotations_to_their_closing_brace() {
        let schema = "// a comment\ncollection A {\n  x: String\n  index byX {\n    terms [.x]\n  }\n}\n\n@role(server)\nfunction f(a) {\n  // inside\n  { k: \"}\" }\n}\nrole r {\n  privileges f { call }\n}\n";
        let items = items(schema);
        let names: Vec<&str> = items.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["collection A", "function f", "role r"]);
        assert_eq!(
            items[1].1,
            "@role(server)\nfunction f(a) {\n  { k: \"}\" }\n}"
        );
        assert!(items[0].1.ends_with("  }\n}"));
    }

    #[test]
    fn a_changed_new_or_missing_item_is_named() {
        let changed = SCHEMA.replace("Math.min(grace, policy.grace)", "grace");
        let problem = verify_text(&changed).expect_err("changed");
        assert!(
            problem.contains("function rotateRefreshToken changed"),
            "{problem}"
        );
        let added = format!("{SCHEMA}\ncollection Extra {{\n}}\n");
        let problem = verify_text(&added).expect_err("added");
        assert!(problem.contains("collection Extra is new"), "{problem}");
        let comment_only = SCHEMA.replace("// Accounts, one per", "// One account per");
        assert_eq!(verify_text(&comment_only), Ok(()));
    }
}
