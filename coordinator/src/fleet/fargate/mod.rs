//! The Fargate runner: one ECS task per job attempt, in the job's own
//! image, with the agent injected by an init container.

pub mod size;
