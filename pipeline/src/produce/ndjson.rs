//! Newline-delimited JSON input for `sluice produce`.
//!
//! Each non-empty line is one job. The key and the job id come from JSON
//! pointers into the line; the payload is the line's bytes unchanged.

use crate::envelope::json_scalar_to_string;
use crate::produce::OutgoingRecord;

/// How the key and job id are taken from each line.
#[derive(Debug, Clone, Default)]
pub struct LineRules {
    /// JSON pointer to the partition key, for example `/repo`. Without it the
    /// records have no key.
    pub key_field: Option<String>,
    /// JSON pointer to the job id, for example `/id`. Without it the worker
    /// uses the record's position as the job id.
    pub id_field: Option<String>,
}

/// A line that cannot become a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct LineError {
    /// 1-based line number in the input.
    pub line: u64,
    pub reason: String,
}

/// Parses one input line into a record for `topic`. Returns `Ok(None)` for a
/// blank line.
pub fn parse_line(
    topic: &str,
    line_number: u64,
    line: &[u8],
    rules: &LineRules,
) -> Result<Option<OutgoingRecord>, LineError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let error = |reason: String| LineError {
        line: line_number,
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| error(format!("not valid JSON: {e}")))?;
    let field = |pointer: &str, what: &str| -> Result<String, LineError> {
        let found = value
            .pointer(pointer)
            .ok_or_else(|| error(format!("missing {what} field {pointer}")))?;
        json_scalar_to_string(found).ok_or_else(|| {
            error(format!(
                "{what} field {pointer} is {found}, expected a string or a number"
            ))
        })
    };
    let key = rules
        .key_field
        .as_deref()
        .map(|pointer| field(pointer, "key"))
        .transpose()?;
    let id = rules
        .id_field
        .as_deref()
        .map(|pointer| field(pointer, "job id"))
        .transpose()?;
    Ok(Some(OutgoingRecord::job(
        topic,
        id.as_deref(),
        key.map(String::into_bytes),
        line.to_vec(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::headers;

    fn rules() -> LineRules {
        LineRules {
            key_field: Some("/repo".into()),
            id_field: Some("/id".into()),
        }
    }

    #[test]
    fn line_becomes_keyed_job_with_id_header() {
        let line = br#"{"id":"7","repo":"a/b"}"#;
        let record = parse_line("t", 1, line, &rules()).unwrap().unwrap();
        assert_eq!(record.key.as_deref(), Some(&b"a/b"[..]));
        assert_eq!(record.payload.as_deref(), Some(&line[..]));
        let id = record
            .headers
            .iter()
            .find(|(n, _)| n == headers::JOB_ID)
            .unwrap();
        assert_eq!(id.1.as_deref(), Some(&b"7"[..]));
    }

    #[test]
    fn blank_line_is_skipped() {
        assert_eq!(
            parse_line("t", 3, b"  \r", &rules())
                .unwrap()
                .map(|r| r.topic),
            None
        );
    }

    #[test]
    fn bad_lines_name_line_and_reason() {
        let error = parse_line("t", 9, b"{oops", &rules()).unwrap_err();
        assert_eq!(error.line, 9);
        assert!(error.reason.contains("not valid JSON"));

        let error = parse_line("t", 4, br#"{"id":"1"}"#, &rules()).unwrap_err();
        assert_eq!(error.to_string(), "line 4: missing key field /repo");

        let error = parse_line("t", 5, br#"{"id":[1],"repo":"r"}"#, &rules()).unwrap_err();
        assert!(error.reason.contains("expected a string or a number"));
    }
}
