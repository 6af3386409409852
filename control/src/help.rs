//! The rule every command line of the project keeps (`ublk-mirror`, `ublk-mirror-ctl`,
//! `nbd-proxy`), checked by each binary's tests: every argument has a description, and every
//! option that takes a value and may be left out says what leaving it out means, with clap's
//! own `[default: ...]` or, where clap cannot show it, a `[default: ...]` in its help text (or
//! says which other option is required instead).

/// For each binary's tests: panics, listing every breaker, unless clap finds `cmd`
/// consistent (`debug_assert`) and every argument keeps the rule.
pub fn assert_rule_kept(cmd: clap::Command) {
    cmd.clone().debug_assert();
    let breakers = rule_breakers(&cmd);
    assert!(breakers.is_empty(), "{breakers:#?}");
}

/// `program subcommand --option` for every argument of `cmd` and its subcommands that breaks
/// the rule, with why.
pub fn rule_breakers(cmd: &clap::Command) -> Vec<String> {
    let mut found = Vec::new();
    walk(cmd, cmd.get_name(), &mut found);
    found
}

fn walk(cmd: &clap::Command, path: &str, found: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        let name = match arg.get_long() {
            Some(long) => format!("{path} --{long}"),
            None => format!("{path} <{}>", arg.get_id()),
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        if help.trim().is_empty() {
            found.push(format!("{name}: no description"));
            continue;
        }
        let optional_value = arg.get_action().takes_values()
            && !arg.is_positional()
            && !arg.is_required_set()
            && !arg.is_hide_set();
        let shown = !arg.get_default_values().is_empty() && !arg.is_hide_default_value_set();
        if optional_value && !shown && !help.contains("[default: ") && !help.contains("required)") {
            found.push(format!("{name}: no default shown"));
        }
    }
    for sub in cmd.get_subcommands() {
        walk(sub, &format!("{path} {}", sub.get_name()), found);
    }
}

#[cfg(test)]
mod tests {
    use clap::{Arg, ArgAction, Command};

    #[test]
    fn finds_options_that_hide_what_leaving_them_out_means() {
        let cmd = Command::new("prog").subcommand(
            Command::new("verb")
                .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue))
                .arg(Arg::new("timeout").long("timeout").help("Seconds"))
                .arg(
                    Arg::new("depth")
                        .long("depth")
                        .help("Depth")
                        .default_value("8"),
                )
                .arg(Arg::new("image").long("image").help("Path [default: none]"))
                .arg(Arg::new("name").help("The name").required(true)),
        );
        assert_eq!(
            super::rule_breakers(&cmd),
            [
                "prog verb --quiet: no description",
                "prog verb --timeout: no default shown"
            ]
        );
    }
}
