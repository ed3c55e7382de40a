//! Python's JSON dialect: diffusers writes configs with `json.dumps`, which spells non-finite floats
//! as the bare tokens `-Infinity`, `Infinity` and `NaN` (DPMSolverMultistepScheduler's default
//! `lambda_min_clipped` is `-Infinity`). serde_json rejects them, so they are read as the strings
//! `"-Infinity"`, `"Infinity"`, `"NaN"`, and written back bare.

use serde_json::Value;

/// The non-finite tokens of Python's json.
const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];

/// Parses JSON text that may hold Python's bare `-Infinity`, `Infinity` or `NaN` values; each
/// becomes the string of the same spelling. Text inside strings is left alone.
pub(crate) fn parse(text: &str) -> serde_json::Result<Value> {
    serde_json::from_str(&quote_non_finite(text))
}

/// `text` with every bare non-finite token outside strings wrapped in quotes.
fn quote_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    if !TOKENS.iter().any(|t| text.contains(t)) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(tok) = TOKENS.iter().find(|t| rest.starts_with(**t)) {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.into()
}

/// Pretty JSON text in which the string value of `key` (a non-finite token stored as a string)
/// is written bare, as Python's json writes the float: `"key": "-Infinity"` becomes
/// `"key": -Infinity`.
pub(crate) fn unquote_non_finite(text: String, key: &str) -> String {
    let mut text = text;
    for tok in TOKENS {
        text = text.replace(&format!("\"{key}\": \"{tok}\""), &format!("\"{key}\": {tok}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_tokens_become_strings_outside_strings_only() {
        let v = parse(r#"{"a": -Infinity, "b": [Infinity, NaN], "c": "x -Infinity \" NaN", "d": 1}"#).unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"][0], "Infinity");
        assert_eq!(v["b"][1], "NaN");
        assert_eq!(v["c"], "x -Infinity \" NaN");
        assert_eq!(v["d"], 1);
        assert!(parse(r#"{"a": -Infinityx}"#).is_err());
    }

    #[test]
    fn unquoting_writes_the_bare_token() {
        let t = unquote_non_finite("{\n  \"l\": \"-Infinity\",\n  \"m\": \"-Infinity\"\n}".into(), "l");
        assert_eq!(t, "{\n  \"l\": -Infinity,\n  \"m\": \"-Infinity\"\n}");
    }
}
