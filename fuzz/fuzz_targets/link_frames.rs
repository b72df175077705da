//! The agent link's bytes, both ways: length-delimited frames of agent and
//! coordinator messages, output stream headers, enrollment messages.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use servitor_proto::agent::{
    AgentMessage, CoordinatorMessage, EnrollRequest, EnrollResponse, OutputHeader,
};
use servitor_proto::frame::{
    read_frame_limited, FrameReader, MAX_AGENT_MESSAGE_BYTES, MAX_OUTPUT_HEADER_BYTES,
};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        // The coordinator reading an agent's control stream.
        let mut frames = FrameReader::with_limit(data, MAX_AGENT_MESSAGE_BYTES);
        while let Ok(Some(_)) = frames.next::<AgentMessage>().await {}
        // The agent reading the coordinator's.
        let mut frames = FrameReader::new(data);
        while let Ok(Some(_)) = frames.next::<CoordinatorMessage>().await {}
        // An output stream's header.
        let mut reader = data;
        let _ = read_frame_limited::<_, OutputHeader>(&mut reader, MAX_OUTPUT_HEADER_BYTES).await;
    });
    let _ = EnrollRequest::decode(data);
    let _ = EnrollResponse::decode(data);
});
