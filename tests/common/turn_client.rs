//! A small STUN/TURN client for the relay tests, built on the `stun`/`turn` crates' message types.

#![allow(dead_code)] // each test binary uses a different part of this module

use mediamesh_actors::turn::credentials;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime};
use stun::agent::TransactionId;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, Getter, METHOD_ALLOCATE,
    METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_DATA, METHOD_SEND, Message, MessageType, Method, Setter,
};
use stun::textattrs::TextAttribute;
use turn::proto::channum::ChannelNumber;
use turn::proto::data::Data;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;

pub const REALM: &str = "mediamesh";
pub const WAIT: Duration = Duration::from_millis(1500);

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn unix_s() -> u64 {
    unix_ms() / 1000
}

/// (url, username, credential) of every `rel="ice-server"` Link header (RFC 9725 §4.6).
pub fn ice_server_links(headers: &reqwest::header::HeaderMap) -> Vec<(String, String, String)> {
    headers
        .get_all("link")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|link| {
            let url = link[1..link.find('>').unwrap()].to_string();
            let param = |name: &str| {
                let start = link.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                link[start..].split('"').next().unwrap().to_string()
            };
            (url, param("username"), param("credential"))
        })
        .collect()
}

/// What a request got back.
#[derive(Debug, PartialEq)]
pub enum Answer {
    Success(Message),
    Error(u16),
}

impl Answer {
    pub fn code(&self) -> u16 {
        match self {
            Answer::Success(_) => 0,
            Answer::Error(code) => *code,
        }
    }
}

pub struct Client {
    pub socket: UdpSocket,
    pub server: SocketAddr,
    username: String,
    password: String,
    pub realm: String,
    pub nonce: String,
}

impl Client {
    pub fn new(server: SocketAddr, username: &str, password: &str) -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        Client {
            socket,
            server,
            username: username.into(),
            password: password.into(),
            realm: REALM.into(),
            nonce: String::new(),
        }
    }

    /// A client with a fresh credential minted from `secret`.
    pub fn minted(server: SocketAddr, secret: &str, identity: &str) -> Client {
        let c = credentials::mint(secret, identity, unix_s() + 600);
        Client::new(server, &c.username, &c.password)
    }

    pub fn build(
        &self,
        method: Method,
        class: stun::message::MessageClass,
        attrs: Vec<Box<dyn Setter>>,
        auth: bool,
    ) -> Message {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(method, class)),
        ];
        setters.extend(attrs);
        if auth {
            setters.push(Box::new(TextAttribute::new(ATTR_USERNAME, self.username.clone())));
            setters.push(Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())));
            setters.push(Box::new(TextAttribute::new(ATTR_NONCE, self.nonce.clone())));
            setters.push(Box::new(MessageIntegrity::new_long_term_integrity(
                self.username.clone(),
                self.realm.clone(),
                self.password.clone(),
            )));
        }
        let mut m = Message::new();
        m.build(&setters).unwrap();
        m
    }

    /// Receives the next STUN message (skipping ChannelData), or None on timeout.
    pub fn recv(&self) -> Option<Message> {
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let Ok((n, _)) = self.socket.recv_from(&mut buf) else {
                return None;
            };
            let mut m = Message::new();
            m.raw = buf[..n].to_vec();
            if m.decode().is_ok() {
                return Some(m);
            }
        }
        None
    }

    /// Sends `m` and returns the response with its transaction id, or None on timeout.
    fn response_to(&self, m: &Message) -> Option<Message> {
        self.socket.send_to(&m.raw, self.server).unwrap();
        loop {
            let r = self.recv()?;
            if r.transaction_id == m.transaction_id {
                return Some(r);
            }
        }
    }

    pub fn exchange(&self, m: &Message) -> Option<Answer> {
        self.response_to(m).map(answer)
    }

    /// An authenticated request; a 401 or 438 challenge is answered once with its nonce.
    pub fn request(&mut self, method: Method, attrs: impl Fn() -> Vec<Box<dyn Setter>>) -> Answer {
        if self.nonce.is_empty() {
            let m = self.build(method, CLASS_REQUEST, attrs(), false);
            let Some(Answer::Error(401)) = self.exchange_raw(&m) else {
                panic!("no 401 challenge");
            };
        }
        let m = self.build(method, CLASS_REQUEST, attrs(), true);
        match self.exchange_raw(&m) {
            Some(Answer::Error(438)) => {
                let m = self.build(method, CLASS_REQUEST, attrs(), true);
                self.exchange_raw(&m).expect("an answer")
            }
            answer => answer.expect("an answer"),
        }
    }

    /// Like `exchange`, and remembers the nonce of a challenge.
    pub fn exchange_raw(&mut self, m: &Message) -> Option<Answer> {
        let r = self.response_to(m)?;
        if let Ok(nonce) = TextAttribute::get_from_as(&r, ATTR_NONCE) {
            self.nonce = nonce.text;
        }
        Some(answer(r))
    }

    /// An Allocate request for a UDP relay, with this client's credentials if `auth`.
    pub fn allocate_request(&self, auth: bool) -> Message {
        self.build(METHOD_ALLOCATE, CLASS_REQUEST, vec![udp_transport()], auth)
    }

    pub fn allocate(&mut self) -> Result<SocketAddr, u16> {
        match self.request(METHOD_ALLOCATE, || vec![udp_transport()]) {
            Answer::Success(m) => {
                let mut relayed = RelayedAddress::default();
                relayed.get_from(&m).unwrap();
                Ok(SocketAddr::new(relayed.ip, relayed.port))
            }
            Answer::Error(code) => Err(code),
        }
    }

    pub fn create_permission(&mut self, peer: SocketAddr) -> u16 {
        self.request(METHOD_CREATE_PERMISSION, || {
            vec![Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            })]
        })
        .code()
    }

    pub fn channel_bind(&mut self, number: u16, peer: SocketAddr) -> u16 {
        self.request(METHOD_CHANNEL_BIND, || {
            vec![
                Box::new(ChannelNumber(number)),
                Box::new(PeerAddress {
                    ip: peer.ip(),
                    port: peer.port(),
                }),
            ]
        })
        .code()
    }

    pub fn send_indication(&self, peer: SocketAddr, data: &[u8]) {
        let m = self.build(
            METHOD_SEND,
            CLASS_INDICATION,
            vec![
                Box::new(PeerAddress {
                    ip: peer.ip(),
                    port: peer.port(),
                }),
                Box::new(Data(data.to_vec())),
            ],
            false,
        );
        self.socket.send_to(&m.raw, self.server).unwrap();
    }

    pub fn channel_data(&self, number: u16, data: &[u8]) {
        let mut raw = number.to_be_bytes().to_vec();
        raw.extend_from_slice(&(data.len() as u16).to_be_bytes());
        raw.extend_from_slice(data);
        self.socket.send_to(&raw, self.server).unwrap();
    }

    /// The next Data indication's (peer, data), skipping everything else until the timeout.
    pub fn recv_data(&self) -> Option<(SocketAddr, Vec<u8>)> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let m = self.recv()?;
            if m.typ == MessageType::new(METHOD_DATA, CLASS_INDICATION) {
                let (mut peer, mut data) = (PeerAddress::default(), Data::default());
                peer.get_from(&m).unwrap();
                data.get_from(&m).unwrap();
                return Some((SocketAddr::new(peer.ip, peer.port), data.0));
            }
        }
        None
    }
}

/// REQUESTED-TRANSPORT UDP, what every Allocate carries.
pub fn udp_transport() -> Box<dyn Setter> {
    Box::new(RequestedTransport {
        protocol: turn::proto::PROTO_UDP,
    })
}

fn answer(r: Message) -> Answer {
    match r.typ.class {
        CLASS_SUCCESS_RESPONSE => Answer::Success(r),
        CLASS_ERROR_RESPONSE => {
            let mut e = ErrorCodeAttribute::default();
            e.get_from(&r).unwrap();
            Answer::Error(e.code.0)
        }
        other => panic!("unexpected class {other:?}"),
    }
}
