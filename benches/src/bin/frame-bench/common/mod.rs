//! What the subcommands share: the paced stream and its clock of `store` and `transport`
//! (flow.rs), and the pieces of every subcommand's report (report.rs).

pub(crate) mod flow;
pub(crate) mod report;
