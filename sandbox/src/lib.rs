//! usher-sandbox: fake vendor servers on loopback: real HTTP on 127.0.0.1, one port, one path
//! prefix per vendor (`/crm/...`). Used by `usher-sandbox demo`, `usher-sandbox serve`, the
//! benchmarks and usher's integration tests, which drive them through their handles (add
//! records, inject faults, read what arrived). Not part of the product: the `usher` binary
//! links none of it.

pub mod callers;
pub mod crm;
pub mod faults;
// S-360
pub mod s360;
// Ticket Co x Airship
pub mod airship;
pub mod ticketco;
// Integration settings branch: CM.com CDP and seats.io fakes.
pub mod cdp;
pub mod seatsio;
// SeatGeek / Halo
pub mod halo;
pub mod seatgeek;

use std::net::SocketAddr;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crm::CrmFake;
pub use faults::{Fault, Faults};
// S-360
pub use s360::{S360Fake, S360Sender};
// Ticket Co x Airship
pub use airship::AirshipFake;
pub use ticketco::TicketCoFake;
// SeatGeek / Halo
pub use halo::HaloFake;
pub use seatgeek::SeatGeekFake;

/// The running fakes.
pub struct Sandbox {
    pub addr: SocketAddr,
    pub crm: CrmFake,
    // S-360: the API under `/s360/{institution}`.
    pub s360: S360Fake,
    // Ticket Co x Airship
    pub ticketco: TicketCoFake,
    pub airship: AirshipFake,
    // Integration settings branch.
    pub cdp: cdp::CdpFake,
    pub seatsio: seatsio::SeatsioFake,
    // SeatGeek / Halo: two SeatGeek accounts (`/seatgeek`, `/seatgeek2`, the same user IDs,
    // e-mails at example.org and example.net) and one Halo (`/halo`).
    pub seatgeek: SeatGeekFake,
    pub seatgeek2: SeatGeekFake,
    pub halo: HaloFake,
    /// Every call with its calling process, once [`callers::record`] was called.
    pub callers: callers::CallLog,
    stop: CancellationToken,
}

impl Sandbox {
    /// Binds `listen` (use `127.0.0.1:0` for a free port) and serves every fake.
    pub async fn start(listen: SocketAddr) -> std::io::Result<Sandbox> {
        let crm = CrmFake::new();
        let s360 = S360Fake::new();
        // Ticket Co x Airship
        let ticketco = TicketCoFake::new();
        let airship = AirshipFake::new();
        // Integration settings branch: CDP and seats.io fakes.
        let cdp = cdp::CdpFake::new();
        let seatsio = seatsio::SeatsioFake::new();
        // SeatGeek / Halo
        let seatgeek = SeatGeekFake::new("example.org");
        let seatgeek2 = SeatGeekFake::new("example.net");
        let halo = HaloFake::new();
        let app = Router::new()
            .nest("/crm", crm.router())
            // S-360
            .nest("/s360", s360.router())
            // Ticket Co x Airship
            .nest("/ticketco", ticketco.router())
            .nest("/airship", airship.router())
            .nest("/cdp", cdp.router())
            .nest("/seatsio", seatsio.router())
            // SeatGeek / Halo
            .nest("/seatgeek", seatgeek.router())
            .nest("/seatgeek2", seatgeek2.router())
            .nest("/halo", halo.router());
        let callers = callers::CallLog::default();
        let app = app.layer(axum::middleware::from_fn_with_state(
            callers.clone(),
            callers::log_call,
        ));
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<callers::Caller>(),
            )
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await;
        });
        Ok(Sandbox {
            addr,
            crm,
            s360,
            ticketco,
            airship,
            cdp,
            seatsio,
            seatgeek,
            seatgeek2,
            halo,
            callers,
            stop,
        })
    }

    /// The base URL of one fake, e.g. `url("crm")` → `http://127.0.0.1:PORT/crm`.
    pub fn url(&self, vendor: &str) -> String {
        format!("http://{}/{vendor}", self.addr)
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
