//! An instance identity document and its PKCS#7 signature, as an agent
//! presents them to enroll: the signature's DER from the input against a
//! well-formed document of a known Region, and the input as the document.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use servitor_coordinator::link::iid::IidVerifier;

const DOCUMENT: &[u8] = br#"{"accountId":"123456789012","architecture":"x86_64","availabilityZone":"us-east-1a","imageId":"ami-0123456789abcdef0","instanceId":"i-0123456789abcdef0","instanceType":"m5.large","pendingTime":"2026-01-01T00:00:00Z","privateIp":"10.0.0.1","region":"us-east-1","version":"2017-09-30"}"#;

fn verifier() -> &'static IidVerifier {
    static VERIFIER: OnceLock<IidVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| IidVerifier::aws(Duration::from_secs(600)))
}

fuzz_target!(|data: &[u8]| {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_700);
    let signature = base64::engine::general_purpose::STANDARD.encode(data);
    let _ = verifier().verify(DOCUMENT, &signature, now);
    let _ = verifier().verify(data, "MA==", now);
});
