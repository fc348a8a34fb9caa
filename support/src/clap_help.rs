//! The check that every flag and argument of a clap command line says what
//! it is in `--help` (perch's and perch-bootstrap's tests use it).

/// Every argument of `cmd` and its subcommands with no help text, as
/// `command subcommand argument`.
pub fn blank_help(cmd: &clap::Command) -> Vec<String> {
    fn walk(cmd: &clap::Command, path: &str, blank: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id != "help" && id != "version" && a.get_help().is_none() {
                blank.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), blank);
        }
    }
    let mut blank = vec![];
    walk(cmd, cmd.get_name(), &mut blank);
    blank
}
