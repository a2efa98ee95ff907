//! Flag parsing, defaults taken from the groups, timing checks.

use super::*;

#[test]
fn peers_parse_and_reject_nonsense() {
    let p: Peers = "2=127.0.0.1:7102, 1=127.0.0.1:7101".parse().unwrap();
    assert_eq!(p.0[0], (1, "127.0.0.1:7101".to_string()));
    for bad in [
        "",
        "1",
        "x=1.2.3.4:5",
        "0=h:1",
        "1=h",
        "1=h:1,1=h:2",
        "1=h:99999",
    ] {
        assert!(bad.parse::<Peers>().is_err(), "{bad} should be refused");
    }
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    node: NodeArgs,
}

/// `hashq node` with `flags` after the ones every node needs.
fn parse(flags: &[&str]) -> NodeArgs {
    let needed = [
        "hashq",
        "--id",
        "1",
        "--peers",
        "1=127.0.0.1:7101",
        "--data-dir",
        "/tmp/x",
    ];
    <Cli as clap::Parser>::try_parse_from(needed.iter().chain(flags))
        .expect("parse")
        .node
}

#[test]
fn the_flags_take_their_defaults_from_the_groups() {
    let c = parse(&["--insecure"]).into_config().expect("config");
    // Every group whole: a flag whose default drifts from its group's fails here.
    assert_eq!(c.timing, Timing::default());
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.scaling, Scaling::default());
    assert_eq!(c.http, HttpLimits::default());
    assert_eq!(c.storage, Storage::default());
    assert_eq!(c.batching, Batching::default());
    for bytes in [1, 1000, 1024, 64 << 10, 3 << 20, 4 << 30, (4 << 30) + 1] {
        assert_eq!(byte_size(&show_bytes(bytes)), Ok(bytes));
    }
}

#[test]
fn default_timing_is_valid_and_bad_timing_is_refused() {
    Timing::default().validate().unwrap();
    let t = Timing {
        raft_heartbeat: Duration::from_millis(200),
        ..Timing::default()
    };
    assert!(t.validate().is_err());
    let t = Timing {
        worker_lost_after: Duration::from_secs(1),
        ..Timing::default()
    };
    assert!(t.validate().is_err());
}

#[test]
fn millis_is_never_zero_and_saturates() {
    assert_eq!(millis(Duration::from_millis(1500)), 1500);
    assert_eq!(millis(Duration::from_micros(1999)), 1);
    assert_eq!(millis(Duration::ZERO), 1);
    assert_eq!(millis(Duration::MAX), u64::MAX);
}

#[test]
fn launcher_ec2_needs_a_build_with_the_ec2_feature() {
    let flags = [
        "--launcher",
        "ec2",
        "--worker-token",
        "0123456789abcdef0123",
        "--cluster-token",
        "fedcba9876543210fedc",
        "--ec2-ami",
        "ami-123",
        "--ec2-instance-profile",
        "hashq-worker",
        "--ec2-instance-id",
        "i-0123456789abcdef0",
    ];
    let resolved = parse(&flags).into_config();
    if cfg!(feature = "ec2") {
        resolved.expect("a build with the EC2 launcher takes these flags");
    } else {
        let err = resolved.expect_err("a build without the EC2 launcher refuses it");
        assert!(matches!(err, ConfigError::NoEc2Build), "{err}");
        assert!(err.to_string().contains("--features ec2"), "{err}");
    }
}

#[test]
fn a_node_either_founds_with_peers_or_joins() {
    let base = ["hashq", "--id", "4", "--data-dir", "/tmp/x", "--insecure"];
    let try_parse = |flags: &[&str]| {
        <Cli as clap::Parser>::try_parse_from(base.iter().chain(flags)).map(|c| c.node)
    };
    let joined = try_parse(&["--join", "http://127.0.0.1:7101/"])
        .expect("--join alone")
        .into_config()
        .expect("config");
    assert_eq!(joined.join.as_deref(), Some("http://127.0.0.1:7101"));
    assert!(joined.peers.0.is_empty());
    assert!(try_parse(&[]).is_err(), "neither --peers nor --join");
    assert!(
        try_parse(&["--peers", "4=h:1", "--join", "http://h:1"]).is_err(),
        "both"
    );
    for bad in ["127.0.0.1:7101", "ftp://h:1", "http://", "http://h:1/x"] {
        assert!(try_parse(&["--join", bad]).is_err(), "--join {bad}");
    }
    let ec2 = try_parse(&["--join", "http://h:1", "--launcher", "ec2"])
        .unwrap()
        .into_config();
    assert!(matches!(ec2, Err(ConfigError::JoinEc2)));
    let advertised = try_parse(&[
        "--join",
        "http://h:1",
        "--launcher",
        "ec2",
        "--advertise",
        "10.0.0.9:7101",
    ])
    .unwrap();
    // (The EC2 settings themselves are checked when the launcher starts.)
    assert_eq!(advertised.advertise.as_deref(), Some("10.0.0.9:7101"));
    let config = try_parse(&["--join", "http://h:1", "--advertise", "10.0.0.9:7101"])
        .unwrap()
        .into_config()
        .unwrap();
    assert_eq!(config.own_addr(), Some("10.0.0.9:7101"));
    let bad = try_parse(&["--join", "http://h:1", "--advertise", "nowhere"])
        .unwrap()
        .into_config();
    assert!(matches!(bad, Err(ConfigError::Invalid(_))));
    let stranger = try_parse(&["--peers", "1=h:1"]).unwrap().into_config();
    assert!(matches!(stranger, Err(ConfigError::NotAPeer(4))));
}

#[test]
fn tls_flags_go_together_and_a_tls_node_joins_over_https() {
    let base = ["hashq", "--id", "4", "--data-dir", "/tmp/x", "--insecure"];
    let try_parse = |flags: &[&str]| {
        <Cli as clap::Parser>::try_parse_from(base.iter().chain(flags)).map(|c| c.node)
    };
    let tls = [
        "--tls-cert",
        "/c.pem",
        "--tls-key",
        "/k.pem",
        "--tls-ca",
        "/ca.pem",
    ];
    let peers = ["--peers", "4=h:1"];
    let config = try_parse(&[&peers[..], &tls[..]].concat())
        .expect("all three")
        .into_config()
        .expect("config");
    let files = config.tls.expect("TLS on");
    assert_eq!(files.ca, std::path::PathBuf::from("/ca.pem"));
    for partial in [&tls[..2], &tls[..4], &tls[2..]] {
        assert!(
            try_parse(&[&peers[..], partial].concat()).is_err(),
            "{partial:?} alone"
        );
    }
    let join = |url: &str, with_tls: bool| {
        let mut flags = vec!["--join", url];
        if with_tls {
            flags.extend(tls);
        }
        try_parse(&flags).unwrap().into_config()
    };
    assert!(join("https://h:1", true).is_ok());
    assert!(matches!(
        join("http://h:1", true),
        Err(ConfigError::Invalid(_))
    ));
    assert!(matches!(
        join("https://h:1", false),
        Err(ConfigError::Invalid(_))
    ));
}

#[test]
fn the_cluster_version_offered_is_within_what_the_build_runs() {
    let offered = |flags: &[&str]| {
        let mut args = vec!["--insecure"];
        args.extend_from_slice(flags);
        parse(&args).into_config().map(|c| c.cluster_version_max)
    };
    assert_eq!(offered(&[]).unwrap(), hashq_raft::version::SUPPORTED);
    assert_eq!(offered(&["--cluster-version-max", "1"]).unwrap(), 1);
    let beyond = (hashq_raft::version::SUPPORTED + 1).to_string();
    for bad in ["0", beyond.as_str()] {
        assert!(
            matches!(
                offered(&["--cluster-version-max", bad]),
                Err(ConfigError::Invalid(_))
            ),
            "{bad}"
        );
    }
}
