//! The endpoint client without a network: endpoint lists, backoff, Retry-After and error classes.

use super::*;

#[test]
fn endpoints_are_normalized() {
    assert_eq!(
        normalize_endpoint(" 127.0.0.1:7101/ ").as_deref(),
        Ok("http://127.0.0.1:7101")
    );
    assert_eq!(
        normalize_endpoint("http://node-1.example").as_deref(),
        Ok("http://node-1.example")
    );
    assert_eq!(
        normalize_endpoint("http://10.0.0.1:7101/prefix/").as_deref(),
        Ok("http://10.0.0.1:7101/prefix")
    );
    assert_eq!(
        normalize_endpoint("https://10.0.0.1:7101/").as_deref(),
        Ok("https://10.0.0.1:7101")
    );
    for bad in [
        "",
        "/",
        "ftp://host",
        "https://",
        "http://",
        "http://h:1/?q=1",
    ] {
        assert!(normalize_endpoint(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn endpoints_rotate_and_wrap() {
    let mut e = Endpoints::new(["http://a:1", "http://b:1", "http://c:1"]).unwrap();
    assert_eq!(e.current(), (0, "http://a:1"));
    assert!(e.advance_from(0));
    assert_eq!(e.current(), (1, "http://b:1"));
    assert!(e.advance_from(1));
    assert!(e.advance_from(2));
    assert_eq!(e.current(), (0, "http://a:1"));
}

#[test]
fn concurrent_failures_on_one_endpoint_move_once() {
    let mut e = Endpoints::new(["http://a:1", "http://b:1", "http://c:1"]).unwrap();
    // Two calls both saw endpoint 0 fail; the second must not skip the healthy b.
    assert!(e.advance_from(0));
    assert!(!e.advance_from(0));
    assert_eq!(e.current(), (1, "http://b:1"));
}

#[test]
fn a_single_endpoint_stays_put() {
    let mut e = Endpoints::new(["http://a:1"]).unwrap();
    assert!(!e.advance_from(0));
    assert_eq!(e.current(), (0, "http://a:1"));
}

#[test]
fn endpoints_dedupe_and_reject_empty() {
    let e = Endpoints::new(["a:1", "http://a:1/", "http://b:1"]).unwrap();
    assert_eq!(e.urls(), ["http://a:1", "http://b:1"]);
    assert!(Endpoints::new(Vec::<String>::new()).is_err());
    assert!(Endpoints::new(["ftp://a"]).is_err());
}

#[test]
fn merge_appends_new_keeps_current_and_skips_bad() {
    let mut e = Endpoints::new(["http://a:1", "http://b:1"]).unwrap();
    assert!(e.advance_from(0));
    let added = e.merge(["http://b:1/", "c:1", "ftp://bad", "http://a:1"]);
    assert_eq!(added, 1);
    assert_eq!(e.urls(), ["http://a:1", "http://b:1", "http://c:1"]);
    assert_eq!(e.current(), (1, "http://b:1"));
    // The merged endpoint takes part in the rotation.
    assert!(e.advance_from(1));
    assert_eq!(e.current(), (2, "http://c:1"));
}

#[test]
fn backoff_grows_then_caps() {
    assert_eq!(backoff_ceiling(0), BACKOFF_BASE);
    assert_eq!(backoff_ceiling(1), BACKOFF_BASE * 2);
    assert_eq!(backoff_ceiling(3), BACKOFF_BASE * 8);
    assert_eq!(backoff_ceiling(20), BACKOFF_MAX);
    assert_eq!(backoff_ceiling(u32::MAX), BACKOFF_MAX);
    for attempt in 0..40 {
        assert!(backoff_ceiling(attempt) <= backoff_ceiling(attempt + 1));
    }
}

#[test]
fn retry_delay_stays_within_bounds() {
    for attempt in 0..40 {
        let ceiling = backoff_ceiling(attempt);
        for jitter in [-1.0, 0.0, 0.3, 1.0, 7.0, f64::NAN] {
            let d = retry_delay(attempt, 3, None, jitter);
            assert!(d <= ceiling, "{attempt} {jitter}: {d:?}");
            assert!(d >= ceiling / 2, "{attempt} {jitter}: {d:?}");
        }
    }
}

#[test]
fn retry_after_waits_only_after_a_full_round_and_is_capped() {
    let asked = Some(Duration::from_millis(700));
    // Endpoints 1 and 2 of 3 have not been tried yet: fail over at once.
    assert!(retry_delay(0, 3, asked, 0.0) < Duration::from_millis(700));
    assert!(retry_delay(1, 3, asked, 0.0) < Duration::from_millis(700));
    // All three said "no leader": honour the request.
    assert_eq!(retry_delay(2, 3, asked, 0.0), Duration::from_millis(700));
    // A single endpoint completes a round on every attempt.
    assert_eq!(retry_delay(0, 1, asked, 0.0), Duration::from_millis(700));
    // Never more than the cap, whatever the node asks.
    assert_eq!(
        retry_delay(2, 3, Some(Duration::from_secs(120)), 0.0),
        BACKOFF_MAX
    );
}

#[test]
fn retry_after_parses_seconds_only() {
    assert_eq!(parse_retry_after("1"), Some(Duration::from_secs(1)));
    assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
    assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    assert_eq!(parse_retry_after("-1"), None);
}

fn body(code: &str) -> Vec<u8> {
    format!(r#"{{"error":{{"code":"{code}","message":"because"}}}}"#).into_bytes()
}

#[test]
fn errors_are_classified_by_code_then_status() {
    let e = classify("http://a:1", 404, None, &body(codes::UNKNOWN_WORKER));
    assert!(matches!(e, ClientError::UnknownWorker { ref message } if message == "because"));
    let e = classify("http://a:1", 409, None, &body(codes::UNKNOWN_SLOT));
    assert!(matches!(e, ClientError::UnknownSlot { .. }));
    let e = classify(
        "http://a:1",
        503,
        Some(Duration::from_secs(1)),
        &body(codes::NO_LEADER),
    );
    assert!(e.is_retryable());
    assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
    for status in [429, 500, 502, 503, 504] {
        assert!(classify("x", status, None, &body("busy")).is_retryable());
    }
    let e = classify("http://a:1", 401, None, &body("unauthorized"));
    assert_eq!(
        e,
        ClientError::Rejected {
            endpoint: "http://a:1".into(),
            status: 401,
            code: "unauthorized".into(),
            message: "because".into(),
        }
    );
    assert!(!e.is_retryable());
}

#[test]
fn a_non_json_error_body_keeps_a_short_text() {
    let long = "x".repeat(10_000);
    match classify("http://a:1", 400, None, long.as_bytes()) {
        ClientError::Rejected { code, message, .. } => {
            assert_eq!(code, "http_400");
            assert_eq!(message.len(), MAX_ERROR_TEXT);
        }
        other => panic!("{other:?}"),
    }
    assert!(classify("http://a:1", 502, None, b"<html>bad gateway</html>").is_retryable());
}
