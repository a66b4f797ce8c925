//! W3C trace context from the Lambda's X-Ray trace header.
//!
//! Lambda hands each invocation an X-Ray header such as
//! `Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1`. Its root's two
//! hex parts (epoch seconds and 96 random bits) make the 128-bit W3C trace id, the same mapping
//! the OpenTelemetry X-Ray propagator uses; `Parent` is the span id and `Sampled` the flag. The
//! broker then logs under the same trace as the function.

/// Returns the `traceparent` header for an X-Ray trace header, or `None` when it has no usable
/// `Root` and `Parent`.
pub fn traceparent_from_xray(header: &str) -> Option<String> {
    let mut root = None;
    let mut parent = None;
    let mut sampled = false;
    for field in header.split(';') {
        match field.trim().split_once('=') {
            Some(("Root", value)) => root = Some(value),
            Some(("Parent", value)) => parent = Some(value),
            Some(("Sampled", value)) => sampled = value == "1",
            _ => {}
        }
    }
    let mut parts = root?.split('-');
    let (Some("1"), Some(epoch), Some(random), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let trace_id = format!("{epoch}{random}").to_ascii_lowercase();
    let parent = parent?.to_ascii_lowercase();
    let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    if !hex(&trace_id, 32) || !hex(&parent, 16) || zero(&trace_id) || zero(&parent) {
        return None;
    }
    let flags = if sampled { "01" } else { "00" };
    Some(format!("00-{trace_id}-{parent}-{flags}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xray_header_maps_to_traceparent() {
        assert_eq!(
            traceparent_from_xray(
                "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
            )
            .as_deref(),
            Some("00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01")
        );
        assert_eq!(
            traceparent_from_xray(
                "Root=1-5759E988-BD862E3FE1BE46A994272793;Parent=53995C3F42CD8AD8;Sampled=0;Lineage=a:1"
            )
            .as_deref(),
            Some("00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-00")
        );
    }

    #[test]
    fn unusable_headers_give_no_traceparent() {
        for header in [
            "",
            "Root=1-5759e988-bd862e3fe1be46a994272793",
            "Parent=53995c3f42cd8ad8;Sampled=1",
            "Root=2-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8",
            "Root=1-5759e988-bd862e3f;Parent=53995c3f42cd8ad8",
            "Root=1-00000000-000000000000000000000000;Parent=53995c3f42cd8ad8",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=0000000000000000",
            "Root=1-5759e988-bd862e3fe1be46a99427279z;Parent=53995c3f42cd8ad8",
        ] {
            assert_eq!(traceparent_from_xray(header), None, "{header}");
        }
    }
}
