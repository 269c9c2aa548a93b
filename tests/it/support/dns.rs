//! A real DNS server on a loopback UDP port, speaking the DNS wire format (hickory-proto, the
//! same library hickory-resolver uses), serving a small fixed zone: enough to exercise
//! `domain verify` against every outcome a real zone can give.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use hickory_resolver::proto::op::{Message, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, CNAME};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

/// What a name holds in the test zone.
#[derive(Clone, Debug)]
pub enum Rec {
    Cname(&'static str),
    A(Ipv4Addr),
    /// The name exists but holds nothing asked for (NOERROR, no answers).
    Empty,
    /// The server never answers queries for this name (a timeout).
    Silent,
}

/// The running server.
pub struct DnsServer {
    pub addr: SocketAddr,
}

fn key(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(s: &str) -> Name {
    Name::from_ascii(format!("{s}.")).expect("name")
}

impl DnsServer {
    /// Serves `zone`; names not in it are NXDOMAIN.
    pub async fn start(zone: &[(&'static str, Rec)]) -> DnsServer {
        let mut map: HashMap<String, Vec<Rec>> = HashMap::new();
        for (n, r) in zone {
            map.entry(n.to_string()).or_default().push(r.clone());
        }
        let map = Arc::new(map);
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = sock.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(reply) = answer(&map, &query) else {
                    continue;
                };
                if let Ok(bytes) = reply.to_vec() {
                    let _ = sock.send_to(&bytes, peer).await;
                }
            }
        });
        DnsServer { addr }
    }
}

fn answer(zone: &HashMap<String, Vec<Rec>>, query: &Message) -> Option<Message> {
    let q = query.queries.first()?.clone();
    let name = key(q.name());
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(q.clone());
    let Some(recs) = zone.get(&name) else {
        reply.metadata.response_code = ResponseCode::NXDomain;
        return Some(reply);
    };
    if recs.iter().any(|r| matches!(r, Rec::Silent)) {
        return None;
    }
    for r in recs {
        let data = match (r, q.query_type()) {
            // A CNAME answers every type, as in a real zone.
            (Rec::Cname(t), _) => RData::CNAME(CNAME(fqdn(t))),
            (Rec::A(ip), RecordType::A) => RData::A(A(*ip)),
            _ => continue,
        };
        reply.add_answer(Record::from_rdata(fqdn(&name), 60, data));
    }
    Some(reply)
}
