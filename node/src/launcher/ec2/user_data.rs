//! A worker instance's user data: the shell script `worker-user-data.sh` (a `format!`
//! template: `{worker}`, `{cluster}`, `{parent}`, `{parent_instance}`, `{token}`, `{tls}`,
//! `{binary_urls}` and `{args}` are filled in) and the checks that keep every value in it one
//! plain word, so no value can break out of its quoting.

use std::fmt::Write as _;
use std::time::Duration;

use hashq_raft::{NodeId, WorkerId};

use crate::config::is_plain_word;
use crate::launcher::LaunchError;

/// Raw user data may be at most this large (an EC2 limit, before base64).
const USER_DATA_LIMIT: usize = 16 * 1024;

/// Everything a worker instance's user data says.
#[derive(Clone, Debug)]
pub struct WorkerBoot<'a> {
    /// The reserved slot the worker fills.
    pub worker: WorkerId,
    /// The launching node.
    pub parent: NodeId,
    /// The launching endpoint's instance id, for the parent check.
    pub parent_instance: &'a str,
    /// `--cluster-name`: the `hashq:cluster` tag.
    pub cluster: &'a str,
    /// The worker credential (written to a root-only file on the instance).
    pub token: &'a str,
    /// Client-API base URLs of the members.
    pub endpoints: &'a [String],
    /// Where to fetch the binary, in order of preference.
    pub binary_urls: &'a [String],
    /// The worker's `--idle-timeout`.
    pub idle_timeout: Duration,
    /// The worker's `--no-endpoint-exit-after`.
    pub orphan_timeout: Duration,
    /// The worker's `--parent-check-every`.
    pub parent_check_every: Duration,
    /// The region the worker's EC2 client uses.
    pub region: &'a str,
    /// An EC2 API endpoint other than AWS's (an emulator).
    pub endpoint_url: Option<&'a str>,
    /// The cluster CA (PEM) of a TLS cluster: written to `/etc/hashq/ca.pem`, trusted by
    /// the binary download and by the worker (`HASHQ_TLS_CA`).
    pub ca_pem: Option<&'a str>,
}

/// Whether `pem` is certificates and nothing else (so it cannot end its here-document).
fn is_certificate_pem(pem: &str) -> bool {
    let mut lines = 0;
    let plain = pem.lines().all(|line| {
        lines += 1;
        line == "-----BEGIN CERTIFICATE-----"
            || line == "-----END CERTIFICATE-----"
            || line
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
    });
    plain && lines >= 3 && pem.contains("-----BEGIN CERTIFICATE-----")
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

/// The user data (a shell script) of a worker instance: it writes the token to a root-only
/// environment file, learns the instance id from IMDSv2, fetches `hashq` from the endpoints
/// (`GET /internal/binary` with the token), and runs `hashq worker` as a systemd service
/// whose end (idle, orphaned, or failing for good) powers the instance off, which terminates
/// it. The token never appears on a command line or in the boot log.
pub fn worker_user_data(boot: &WorkerBoot<'_>) -> Result<String, LaunchError> {
    let words = [boot.parent_instance, boot.cluster, boot.region]
        .into_iter()
        .chain(boot.endpoint_url)
        .chain(boot.endpoints.iter().map(String::as_str))
        .chain(boot.binary_urls.iter().map(String::as_str));
    for word in words {
        if !is_plain_word(word) {
            return Err(LaunchError::Failed(format!(
                "`{word}` cannot go into worker user data"
            )));
        }
    }
    if boot.token.is_empty() || !boot.token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(LaunchError::Failed(
            "the worker credential must be visible ASCII".into(),
        ));
    }
    let tls = match boot.ca_pem {
        Some(pem) if is_certificate_pem(pem) => format!(
            "cat > /etc/hashq/ca.pem <<'HASHQ_CA'\n{}\nHASHQ_CA\nchmod 0644 /etc/hashq/ca.pem\n\
             echo HASHQ_TLS_CA=/etc/hashq/ca.pem >> /etc/hashq/worker.env\n\
             curl_tls=(--cacert /etc/hashq/ca.pem)\n",
            pem.trim_end()
        ),
        Some(_) => {
            return Err(LaunchError::Failed(
                "the cluster CA file holds more than certificates".into(),
            ))
        }
        None => String::new(),
    };
    let mut args = format!(
        "worker --worker-id {} --parent {} --handle ${{HASHQ_HANDLE}} --endpoints {} \
         --idle-timeout {} --no-endpoint-exit-after {} --cluster-name {} \
         --ec2-parent-instance {} --ec2-region {} --parent-check-every {} --shutdown-on-orphan",
        boot.worker.0,
        boot.parent,
        boot.endpoints.join(","),
        human(boot.idle_timeout),
        human(boot.orphan_timeout),
        boot.cluster,
        boot.parent_instance,
        boot.region,
        human(boot.parent_check_every),
    );
    if let Some(url) = boot.endpoint_url {
        let _ = write!(args, " --ec2-endpoint-url {url}");
    }
    let script = format!(
        include_str!("worker-user-data.sh"),
        worker = boot.worker,
        cluster = boot.cluster,
        parent = boot.parent,
        parent_instance = boot.parent_instance,
        token = boot.token,
        tls = tls,
        binary_urls = boot.binary_urls.join(" "),
        args = args,
    );
    if script.len() > USER_DATA_LIMIT {
        return Err(LaunchError::Failed(format!(
            "worker user data is {} bytes, over the EC2 limit of {USER_DATA_LIMIT}",
            script.len()
        )));
    }
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot<'a>(endpoints: &'a [String], urls: &'a [String]) -> WorkerBoot<'a> {
        WorkerBoot {
            worker: WorkerId(7),
            parent: 2,
            parent_instance: "i-0123456789abcdef0",
            cluster: "prod",
            token: "s3cret-token",
            endpoints,
            binary_urls: urls,
            idle_timeout: Duration::from_secs(600),
            orphan_timeout: Duration::from_secs(30),
            parent_check_every: Duration::from_secs(15),
            region: "eu-west-1",
            ca_pem: None,
            endpoint_url: None,
        }
    }

    #[test]
    fn user_data_runs_the_worker_with_its_slot_parent_and_handle() {
        let endpoints = vec![
            "http://10.0.0.1:7101".to_string(),
            "http://10.0.0.2:7101".to_string(),
        ];
        let urls = vec!["http://10.0.0.2:7101/internal/binary".to_string()];
        let script = worker_user_data(&boot(&endpoints, &urls)).unwrap();
        assert!(script.starts_with("#!/bin/bash\n"));
        let exec = script
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/hashq "))
            .unwrap();
        for part in [
            "worker --worker-id 7 --parent 2 --handle ${HASHQ_HANDLE}",
            "--endpoints http://10.0.0.1:7101,http://10.0.0.2:7101",
            "--idle-timeout 10m",
            "--ec2-parent-instance i-0123456789abcdef0",
            "--ec2-region eu-west-1",
            "--cluster-name prod",
            "--shutdown-on-orphan",
        ] {
            assert!(exec.contains(part), "{part} missing from {exec}");
        }
        // The token is in the root-only environment file, never on a command line.
        assert_eq!(script.matches("s3cret-token").count(), 1);
        assert!(script.contains("HASHQ_WORKER_TOKEN=s3cret-token\n"));
        assert!(!exec.contains("token"));
        assert!(script.contains("binary_urls='http://10.0.0.2:7101/internal/binary'"));
        assert!(script.contains("SuccessAction=poweroff"));
        for secret in ["AWS_ACCESS_KEY", "AWS_SECRET", "aws_access_key"] {
            assert!(!script.contains(secret));
        }
    }

    #[test]
    fn user_data_refuses_values_that_could_break_out_of_it() {
        let endpoints = vec!["http://10.0.0.1:7101".to_string()];
        let urls = vec!["http://10.0.0.1:7101/internal/binary".to_string()];
        let mut b = boot(&endpoints, &urls);
        b.token = "a\nb";
        assert!(worker_user_data(&b).is_err());
        let mut b = boot(&endpoints, &urls);
        b.cluster = "x'; rm -rf /";
        assert!(worker_user_data(&b).is_err());
    }

    #[test]
    fn a_tls_cluster_s_workers_trust_its_ca_and_nothing_breaks_out_of_it() {
        let endpoints = vec!["https://10.0.0.1:7101".to_string()];
        let urls = vec!["https://10.0.0.1:7101/internal/binary".to_string()];
        let pem = "-----BEGIN CERTIFICATE-----\nMIIBaz+/==\n-----END CERTIFICATE-----\n";
        let mut b = boot(&endpoints, &urls);
        b.ca_pem = Some(pem);
        let script = worker_user_data(&b).unwrap();
        assert!(script.contains(&format!(
            "cat > /etc/hashq/ca.pem <<'HASHQ_CA'\n{}\nHASHQ_CA\n",
            pem.trim_end()
        )));
        assert!(script.contains("echo HASHQ_TLS_CA=/etc/hashq/ca.pem >> /etc/hashq/worker.env"));
        assert!(script.contains("curl_tls=(--cacert /etc/hashq/ca.pem)"));
        assert!(script.contains("curl \"${curl_tls[@]}\" -fsS"));
        // Without TLS the array stays empty and no CA is written.
        let plain = worker_user_data(&boot(&endpoints, &urls)).unwrap();
        assert!(!plain.contains("/etc/hashq/ca.pem"));
        for bad in [
            "HASHQ_CA\nrm -rf /\n",
            "-----BEGIN CERTIFICATE-----\nHASHQ_CA\n-----END CERTIFICATE-----",
            "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----",
        ] {
            let mut b = boot(&endpoints, &urls);
            b.ca_pem = Some(bad);
            assert!(worker_user_data(&b).is_err(), "{bad:?} accepted");
        }
    }
}
