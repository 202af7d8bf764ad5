//! Reading `/proc/PID/stat`, whose second field (the command name, in parentheses) may itself
//! hold spaces and parentheses: fields are counted after its last `)`.

/// The fields of a `/proc/PID/stat` line after the command name: the state (field 3) first,
/// then the parent, the process group, and so on. None when the line has no command name.
pub fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat.get(stat.rfind(')')? + 1..)?.split_whitespace())
}

/// The `/proc/PID/stat` line of process `pid`, read now; None when it is gone.
pub fn read_stat(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_start_after_the_last_parenthesis() {
        let fields: Vec<&str> = stat_fields("7 (a) b (c)) Z 1 99 0").unwrap().collect();
        assert_eq!(fields, ["Z", "1", "99", "0"]);
        assert!(stat_fields("7 (git").is_none());
    }
}
