//! Service REST, DPS REST and control API over HTTPS, including bad input: malformed
//! JSON, unknown routes, missing credentials or api-version, etag preconditions.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish};
use serde_json::{Value, json};
use tether_hub_emulator::{
    C2dRequest, Enrollment, Hub, HubConfig, HubError, derive_device_key, generate_sas_token,
};

const API: &str = "api-version=2021-04-12";

#[tokio::test]
async fn registry_crud_etags_and_error_bodies() {
    let hub = start_hub().await;
    let (http, base, auth) = (
        http(&hub),
        base_url(&hub),
        service_auth(&hub, "iothubowner"),
    );
    let url = format!("{base}/devices/reg-1?{API}");

    let created = http
        .put(&url)
        .header("Authorization", &auth)
        .json(&json!({"deviceId": "reg-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let etag = created.headers()["etag"].to_str().unwrap().to_string();
    let body: Value = created.json().await.unwrap();
    assert_eq!(body["authentication"]["type"], "sas");
    assert_eq!(
        body["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .len(),
        44
    );
    assert_eq!(format!("\"{}\"", body["etag"].as_str().unwrap()), etag);
    assert_eq!(body["connectionState"], "Disconnected");

    let dup = http
        .put(&url)
        .header("Authorization", &auth)
        .json(&json!({"deviceId": "reg-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(dup.status(), 409);
    assert_eq!(dup.headers()["iothub-errorcode"], "DeviceAlreadyExists");
    assert_eq!(error_code(&dup.json().await.unwrap()), 409001);

    // Quoted, unquoted and wildcard If-Match.
    let upd = |if_match: String, status: &'static str| {
        let (http, url, auth) = (http.clone(), url.clone(), auth.clone());
        async move {
            http.put(&url)
                .header("Authorization", auth)
                .header("If-Match", if_match)
                .json(&json!({"deviceId": "reg-1", "status": status}))
                .send()
                .await
                .unwrap()
        }
    };
    let r = upd(etag.clone(), "disabled").await;
    assert_eq!(r.status(), 200);
    let etag2 = r.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_string();
    let stale = upd(etag.clone(), "enabled").await;
    assert_eq!(stale.status(), 412);
    assert_eq!(stale.headers()["iothub-errorcode"], "PreconditionFailed");
    assert_eq!(error_code(&stale.json().await.unwrap()), 412001);
    assert_eq!(upd(etag2, "enabled").await.status(), 200);
    assert_eq!(upd("\"*\"".into(), "enabled").await.status(), 200);
    assert_eq!(upd("*".into(), "enabled").await.status(), 200);

    let list: Value = http
        .get(format!("{base}/devices?top=10&{API}"))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);

    let del = http
        .delete(&url)
        .header("Authorization", &auth)
        .header("If-Match", "\"AAAA\"")
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 412);
    assert_eq!(
        http.delete(&url)
            .header("Authorization", &auth)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let gone = http
        .get(&url)
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    assert_eq!(gone.headers()["iothub-errorcode"], "DeviceNotFound");
    assert_eq!(error_code(&gone.json().await.unwrap()), 404001);
    stop(hub).await;
}

#[tokio::test]
async fn bad_requests_get_iot_hub_errors() {
    let hub = start_hub().await;
    hub.create_device("b1").unwrap();
    let (http, base, auth) = (
        http(&hub),
        base_url(&hub),
        service_auth(&hub, "iothubowner"),
    );

    for (body, what) in [
        ("{not json", "malformed"),
        ("[1,2]", "wrong shape"),
        ("", "empty"),
    ] {
        let r = http
            .put(format!("{base}/devices/new?{API}"))
            .header("Authorization", &auth)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{what}");
        assert_eq!(
            r.headers()["iothub-errorcode"],
            "IotHubFormatError",
            "{what}"
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["ExceptionMessage"], "");
        assert_eq!(error_code(&v), 400006);
    }
    let r = http
        .patch(format!("{base}/twins/b1?{API}"))
        .header("Authorization", &auth)
        .body("{\"properties\":")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .patch(format!("{base}/twins/b1?{API}"))
        .header("Authorization", &auth)
        .json(&json!({"properties": {"desired": {"bad key": 1}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(&r.json().await.unwrap()), 400004);
    let r = http
        .put(format!("{base}/devices/bad%2Fid?{API}"))
        .header("Authorization", &auth)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // The WebSocket endpoint needs an upgrade with subprotocol mqtt.
    assert_eq!(
        http.get(format!("{base}/$iothub/websocket"))
            .send()
            .await
            .unwrap()
            .status(),
        400
    );

    let r = http
        .get(format!("{base}/nothing/here?{API}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["Message"].is_string());
    assert_eq!(
        http.post(format!("{base}/devices/b1?{API}"))
            .header("Authorization", &auth)
            .send()
            .await
            .unwrap()
            .status(),
        405
    );

    let r = http
        .get(format!("{base}/devices/b1?{API}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(&r.json().await.unwrap()), 401002);
    let expired = generate_sas_token(
        "localhost",
        "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=",
        Some("iothubowner"),
        now() + 60,
    )
    .unwrap();
    assert_eq!(
        http.get(format!("{base}/devices/b1?{API}"))
            .header("Authorization", expired)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let read_only = service_auth(&hub, "registryRead");
    assert_eq!(
        http.get(format!("{base}/devices/b1?{API}"))
            .header("Authorization", &read_only)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.delete(format!("{base}/devices/b1?{API}"))
            .header("Authorization", &read_only)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let r = http
        .get(format!("{base}/devices/b1"))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["iothub-errorcode"], "InvalidProtocolVersion");
    stop(hub).await;
}

#[tokio::test]
async fn twins_and_direct_methods() {
    let hub = start_hub().await;
    let (http, base, auth) = (http(&hub), base_url(&hub), service_auth(&hub, "service"));
    let mut dev = connected_device(&hub, "m1").await;
    dev.subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce)
        .await;
    dev.subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtLeastOnce)
        .await;

    let twin: Value = http
        .get(format!("{base}/twins/m1?{API}"))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(twin["etag"], "AAAAAAAAAAE=");
    assert_eq!(twin["connectionState"], "Connected");
    assert!(twin["properties"]["desired"]["$metadata"]["$lastUpdated"].is_string());
    let r = http
        .patch(format!("{base}/twins/m1?{API}"))
        .header("Authorization", &auth)
        .header("If-Match", "\"AAAAAAAAAAE=\"")
        .json(&json!({"tags": {"site": "lab"}, "properties": {"desired": {"rate": 2}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let p = dev.recv_publish().await;
    assert_eq!(p.topic, "$iothub/twin/PATCH/properties/desired/?$version=2");
    assert_eq!(
        serde_json::from_slice::<Value>(&p.payload).unwrap(),
        json!({"rate": 2, "$version": 2})
    );
    let r = http
        .put(format!("{base}/twins/m1?{API}"))
        .header("Authorization", &auth)
        .json(&json!({"properties": {"desired": {"mode": "eco"}}}))
        .send()
        .await
        .unwrap();
    let twin: Value = r.json().await.unwrap();
    assert_eq!(twin["properties"]["desired"]["mode"], "eco");
    assert!(twin["properties"]["desired"].get("rate").is_none());
    assert!(twin.get("tags").is_none());
    dev.recv_publish().await;

    // Method answered by the device.
    let invoke = |body: Value| {
        let (http, url, auth) = (
            http.clone(),
            format!("{base}/twins/m1/methods?{API}"),
            auth.clone(),
        );
        tokio::spawn(async move {
            http.post(url)
                .header("Authorization", auth)
                .json(&body)
                .send()
                .await
                .unwrap()
        })
    };
    let call = invoke(
        json!({"methodName": "reboot", "payload": {"in": 1}, "responseTimeoutInSeconds": 5}),
    );
    let req = dev.recv_publish().await;
    assert!(
        req.topic.starts_with("$iothub/methods/POST/reboot/?$rid="),
        "{}",
        req.topic
    );
    assert_eq!(req.qos, QoS::AtMostOnce);
    let rid = req.topic.rsplit('=').next().unwrap().to_string();
    dev.send(Packet::Publish(Publish::new(
        format!("$iothub/methods/res/200/?$rid={rid}"),
        QoS::AtMostOnce,
        r#"{"out":2}"#,
    )))
    .await;
    let r = call.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"status": 200, "payload": {"out": 2}})
    );

    // No answer: 504101 after the response timeout.
    let start = tokio::time::Instant::now();
    let r = invoke(json!({"methodName": "slow", "responseTimeoutInSeconds": 5}))
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_secs(5));
    assert_eq!(r.status(), 504);
    let inner: Value = serde_json::from_str(
        r.json::<Value>().await.unwrap()["Message"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(inner["errorCode"], 504101);
    assert_eq!(
        inner["message"],
        "Timed out waiting for the response from device."
    );
    assert_eq!(inner["info"]["timeout"], "00:00:05");

    // Payloads up to 128 KB (as serialized JSON) reach the device, larger ones are refused.
    let limit = 128 * 1024;
    let string_of_len = |json_len: usize| Value::String("x".repeat(json_len - 2));
    let call = invoke(
        json!({"methodName": "big", "payload": string_of_len(limit), "responseTimeoutInSeconds": 5}),
    );
    // Skips the unanswered "slow" request above.
    let req = loop {
        let p = dev.recv_publish().await;
        if p.topic.starts_with("$iothub/methods/POST/big/") {
            break p;
        }
    };
    assert_eq!(req.payload.len(), limit);
    let rid = req.topic.rsplit('=').next().unwrap().to_string();
    // A response above 128 KB is refused too: 413 at once, not a timeout.
    dev.send(Packet::Publish(Publish::new(
        format!("$iothub/methods/res/200/?$rid={rid}"),
        QoS::AtMostOnce,
        string_of_len(limit + 1).to_string(),
    )))
    .await;
    let r = call.await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["iothub-errorcode"], "MessageTooLarge");
    assert_eq!(error_code(&r.json().await.unwrap()), 413001);
    let r = invoke(
        json!({"methodName": "big", "payload": string_of_len(limit + 1), "responseTimeoutInSeconds": 5}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["iothub-errorcode"], "ArgumentInvalid");
    assert_eq!(error_code(&r.json().await.unwrap()), 400004);
    assert_eq!(
        dev.recv_within(Duration::from_millis(200)).await,
        None,
        "refused request reached the device"
    );
    // The device's connection survives its oversized answer.
    dev.send(Packet::PingReq).await;
    assert_eq!(dev.recv().await, Some(Packet::PingResp));

    let r = invoke(json!({"methodName": "x", "responseTimeoutInSeconds": 301}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let inner: Value = serde_json::from_str(
        r.json::<Value>().await.unwrap()["Message"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (inner["errorCode"].as_i64(), inner["message"].as_str()),
        (
            Some(400004),
            Some("responseTimeoutInSeconds must be within [5; 300].")
        )
    );
    let r = http
        .post(format!("{base}/twins/nobody/methods?{API}"))
        .header("Authorization", &auth)
        .json(&json!({"methodName": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(&r.json().await.unwrap()), 404001);
    stop(hub).await;
}

#[tokio::test]
async fn dps_rest_register_poll_and_status() {
    let hub = start_hub().await;
    let group = hub
        .add_enrollment(Enrollment::Group {
            group_id: "g".into(),
            primary_key: None,
            secondary_key: None,
        })
        .unwrap();
    let (http, base, scope) = (http(&hub), base_url(&hub), hub.dps_scope_id().to_string());
    let key = derive_device_key(&group.primary_key, "rest-dev").unwrap();
    let token = generate_sas_token(
        &format!("{scope}/registrations/rest-dev"),
        &key,
        Some("registration"),
        now() + 60,
    )
    .unwrap();
    let api = "api-version=2019-03-31";

    let r = http
        .put(format!(
            "{base}/{scope}/registrations/rest-dev/register?{api}"
        ))
        .header("Authorization", &token)
        .json(&json!({"registrationId": "rest-dev"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(
        r.headers()["location"].to_str().unwrap(),
        format!(
            "https://localhost:{}/{scope}/registrations/rest-dev/register",
            hub.https_addr().port()
        )
    );
    let op: Value = r.json().await.unwrap();
    assert_eq!(op["status"], "assigning");
    let op_id = op["operationId"].as_str().unwrap();
    let r: Value = http
        .get(format!(
            "{base}/{scope}/registrations/rest-dev/operations/{op_id}?{api}"
        ))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], "assigned");
    assert_eq!(r["registrationState"]["deviceId"], "rest-dev");
    assert_eq!(
        r["registrationState"]["symmetricKey"]["enrollmentGroupId"],
        "g"
    );
    let st: Value = http
        .post(format!("{base}/{scope}/registrations/rest-dev?{api}"))
        .header("Authorization", &token)
        .json(&json!({"registrationId": "rest-dev"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["status"], "assigned");
    assert_eq!(
        hub.control().device_info("rest-dev").unwrap().primary_key,
        key
    );

    let r = http
        .put(format!(
            "{base}/{scope}/registrations/rest-dev/register?{api}"
        ))
        .header(
            "Authorization",
            "SharedAccessSignature sr=x&sig=AA%3D%3D&se=1",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-ms-error-code"], "401002");
    assert_eq!(r.json::<Value>().await.unwrap()["errorCode"], 401002);
    let r = http
        .put(format!(
            "{base}/{scope}/registrations/rest-dev/register?{api}"
        ))
        .header("Authorization", &token)
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!(
            "{base}/{scope}/registrations/rest-dev/operations/nope?{api}"
        ))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    stop(hub).await;
}

#[tokio::test]
async fn control_api_c2d_events_connection_and_faults() {
    let hub = start_hub().await;
    let (http, base, ctl) = (http(&hub), base_url(&hub), control_auth(&hub));
    let mut dev = connected_device(&hub, "ctl").await;
    dev.subscribe("devices/ctl/messages/devicebound/#", QoS::AtLeastOnce)
        .await;

    let r: Value = http
        .post(format!("{base}/emulator/devices/ctl/c2d?ttlSecs=60"))
        .header("Authorization", &ctl)
        .header("iothub-app-x", "1")
        .header("iothub-messageid", "id-7")
        .body("hi")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["messageId"], "id-7");
    let p = dev.recv_publish().await;
    assert!(
        p.topic.contains("%24.mid=id-7") && p.topic.ends_with("&x=1"),
        "{}",
        p.topic
    );
    let r = http
        .post(format!("{base}/emulator/devices/ghost/c2d"))
        .header("Authorization", &ctl)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Long-poll: the request waits until telemetry arrives.
    let since = hub.control().last_event_seq();
    let poll = tokio::spawn({
        let (http, base, ctl) = (http.clone(), base.clone(), ctl.clone());
        async move {
            http.get(format!(
                "{base}/emulator/events?since={since}&type=telemetry&wait=10"
            ))
            .header("Authorization", &ctl)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    dev.send(Packet::Publish(Publish::new(
        "devices/ctl/messages/events/a=b",
        QoS::AtMostOnce,
        "t1",
    )))
    .await;
    let page = poll.await.unwrap();
    assert_eq!(page["events"][0]["type"], "telemetry");
    assert_eq!(page["events"][0]["body"], "t1");
    assert_eq!(page["events"][0]["properties"]["a"], "b");
    assert_eq!(page["next"], page["events"][0]["seq"]);

    let c: Value = http
        .get(format!("{base}/emulator/devices/ctl/connection"))
        .header("Authorization", &ctl)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(c["connected"], true);
    let r = http
        .post(format!("{base}/emulator/devices/ctl/disconnect"))
        .header("Authorization", &ctl)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(dev.recv().await, None);
    let r = http
        .post(format!("{base}/emulator/faults"))
        .header("Authorization", &ctl)
        .json(&json!({"type": "Bogus"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(format!("{base}/emulator/faults"))
        .header("Authorization", &ctl)
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(format!("{base}/emulator/faults"))
        .header("Authorization", &ctl)
        .json(&json!({"type": "InvokeAuthError", "deviceId": "ctl", "durationSecs": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let info = hub.control().device_info("ctl").unwrap();
    let (_, ack) = connect_device_with(&hub, "ctl", &info.primary_key, false, None).await;
    assert_eq!(
        ack.code,
        rumqttc::mqttbytes::v4::ConnectReturnCode::NotAuthorized
    );
    let r: Value = http
        .post(format!("{base}/emulator/enrollments"))
        .header("Authorization", &ctl)
        .json(&json!({"type": "individual", "registrationId": "e1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["id"], "e1");
    assert_eq!(r["primaryKey"].as_str().unwrap().len(), 44);
    // X.509 attestation is not served: refused, not stored as a key enrollment.
    let r = http
        .post(format!("{base}/emulator/enrollments"))
        .header("Authorization", &ctl)
        .json(&json!({"type": "individual", "registrationId": "e2",
            "attestation": {"type": "x509", "x509": {"clientCertificates": {}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("unknown field `attestation`"), "{text}");
    stop(hub).await;
}

/// Every control route refuses a request without the control token, with a wrong one, or
/// with the hub owner's SAS token: 401, and nothing changes (the hub's clock stays, no
/// enrollment appears). The right token works.
#[tokio::test]
async fn control_api_needs_the_bearer_token() {
    let hub = start_hub().await;
    let (http, base, ctl) = (http(&hub), base_url(&hub), control_auth(&hub));
    hub.create_device("tok-1").unwrap();
    // An owner token valid for one more minute: a clock shifted by an hour expires it.
    let cs = hub.policy_connection_string("iothubowner").unwrap();
    let key = cs
        .split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .unwrap();
    let host = format!("localhost:{}", hub.https_addr().port());
    let short = generate_sas_token(&host, key, Some("iothubowner"), now() + 60).unwrap();
    let get_device = || {
        http.get(format!("{base}/devices/tok-1?{API}"))
            .header("Authorization", &short)
            .send()
    };
    assert_eq!(get_device().await.unwrap().status(), 200);

    let routes = [
        ("GET", "events?since=0"),
        ("POST", "devices/tok-1/c2d"),
        ("GET", "devices/tok-1/connection"),
        ("POST", "devices/tok-1/disconnect"),
        ("POST", "devices/tok-1/expire-token"),
        ("POST", "faults"),
        ("POST", "clock"),
        ("POST", "enrollments"),
    ];
    let bodies = [
        (
            "faults",
            json!({"type": "InvokeAuthError", "durationSecs": 60}),
        ),
        ("clock", json!({"offsetSecs": 3600})),
        (
            "enrollments",
            json!({"type": "individual", "registrationId": "sneaky"}),
        ),
    ];
    let owner_sas = service_auth(&hub, "iothubowner");
    let refused = [
        (None, "no control token given"),
        (Some("Bearer wrong-token"), "wrong control token"),
        (
            Some(&format!("Bearer {}x", hub.control_token())[..]),
            "wrong control token",
        ),
        (Some(hub.control_token()), "no control token given"),
        (Some(&owner_sas[..]), "no control token given"),
    ];
    for (auth, what) in refused {
        for (method, path) in routes {
            let body = bodies
                .iter()
                .find(|(p, _)| path == *p)
                .map_or(json!({}), |(_, b)| b.clone());
            let url = format!("{base}/emulator/{path}");
            let mut req = match method {
                "GET" => http.get(&url),
                _ => http.post(&url).json(&body),
            };
            if let Some(auth) = auth {
                req = req.header("Authorization", auth);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {auth:?}");
            assert_eq!(r.headers()["iothub-errorcode"], "IotHubUnauthorizedAccess");
            assert!(
                r.headers()["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Bearer")
            );
            let body: Value = r.json().await.unwrap();
            assert_eq!(error_code(&body), 401002);
            let message = body["Message"].as_str().unwrap();
            assert!(message.contains(what), "{message}");
            assert!(
                message.contains("Authorization: Bearer <control token>")
                    && message.contains("control-token"),
                "{message}"
            );
            assert!(!message.contains(hub.control_token()), "{message}");
        }
    }
    // Nothing happened: the clock is where it was, no enrollment, the device connects.
    assert_eq!(get_device().await.unwrap().status(), 200);
    assert!(hub.control().enrollment("sneaky").is_none());
    let _ = connected_device(&hub, "tok-1").await;

    // The right token, with the scheme in any case.
    let r = http
        .post(format!("{base}/emulator/clock"))
        .header("Authorization", &ctl)
        .json(&json!({"offsetSecs": 3600}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(get_device().await.unwrap().status(), 401);
    let r = http
        .post(format!("{base}/emulator/clock"))
        .header("Authorization", format!("bearer {}", hub.control_token()))
        .json(&json!({"offsetSecs": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(get_device().await.unwrap().status(), 200);
    // Nor is the control token a credential anywhere else (the SDK-facing paths keep
    // their SAS checks, and the other tests show they need no control token).
    let r = http
        .put(format!(
            "{base}/{}/registrations/x/register?api-version=2019-03-31",
            hub.dps_scope_id()
        ))
        .header("Authorization", &ctl)
        .json(&json!({"registrationId": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-ms-error-code"], "401002");
    stop(hub).await;
}

/// The generated token lives in `<state dir>/control-token` (owner-only), survives a
/// restart with or without `persist`, and gives way to one the embedder sets.
#[tokio::test]
async fn control_token_is_stored_and_stable_across_restarts() {
    let dir = unique_dir("ctl-token");
    let config = HubConfig {
        mqtt_port: 0,
        https_port: 0,
        state_dir: dir.clone(),
        ..HubConfig::default()
    };
    let events = async |hub: &Hub, auth: &str| {
        http(hub)
            .get(format!("{}/emulator/events?since=0", base_url(hub)))
            .header("Authorization", auth)
            .send()
            .await
            .unwrap()
            .status()
    };
    let hub = Hub::start(config.clone()).await.unwrap();
    let token = hub.control_token().to_string();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    let file = dir.join("control-token");
    assert_eq!(hub.control_token_path(), Some(file.as_path()));
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), token);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    hub.shutdown().await;

    for persist in [false, true] {
        let hub = Hub::start(HubConfig {
            persist,
            ..config.clone()
        })
        .await
        .unwrap();
        assert_eq!(hub.control_token(), token);
        assert_eq!(events(&hub, &format!("Bearer {token}")).await, 200);
        hub.shutdown().await;
    }

    // Set by the embedder: that one counts, the file's does not, and the file stays.
    let hub = Hub::start(HubConfig {
        control_token: Some("embedder-token".into()),
        ..config.clone()
    })
    .await
    .unwrap();
    assert_eq!(hub.control_token(), "embedder-token");
    assert_eq!(hub.control_token_path(), None);
    assert_eq!(events(&hub, "Bearer embedder-token").await, 200);
    assert_eq!(events(&hub, &format!("Bearer {token}")).await, 401);
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), token);
    hub.shutdown().await;
    let bad = Hub::start(HubConfig {
        control_token: Some("two words".into()),
        ..config
    })
    .await;
    assert!(matches!(bad, Err(HubError::Config(_))));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn websocket_subprotocol_is_case_insensitive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = start_hub().await;
    let mut tls = tls_connect(&hub, hub.https_addr()).await.expect("tls");
    let req = "GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: MQTT\r\n\r\n";
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-protocol: mqtt"), "{head}");
    assert!(head.contains("s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    stop(hub).await;
}

#[tokio::test]
async fn state_persists_across_restarts_when_enabled() {
    let dir = unique_dir("persist");
    let config = HubConfig {
        mqtt_port: 0,
        https_port: 0,
        state_dir: dir.clone(),
        persist: true,
        ..HubConfig::default()
    };
    let hub = Hub::start(config.clone()).await.unwrap();
    let info = hub.create_device("keep").unwrap();
    hub.control()
        .send_c2d(
            "keep",
            tether_hub_emulator::C2dRequest {
                body: b"later".to_vec(),
                ..Default::default()
            },
        )
        .unwrap();
    let service_cs = hub.service_connection_string();
    let ca = hub.ca_cert_pem().to_string();
    hub.shutdown().await;

    let hub = Hub::start(config).await.unwrap();
    assert_eq!(hub.ca_cert_pem(), ca);
    assert_eq!(
        hub.control().device_info("keep").unwrap().primary_key,
        info.primary_key
    );
    // Ports differ (ephemeral), keys do not.
    assert_eq!(
        service_cs.rsplit(';').next(),
        hub.service_connection_string().rsplit(';').next()
    );
    let (mut c, _) = connect_device_with(&hub, "keep", &info.primary_key, false, None).await;
    c.subscribe("devices/keep/messages/devicebound/#", QoS::AtLeastOnce)
        .await;
    assert_eq!(&c.recv_publish().await.payload[..], b"later");
    hub.shutdown().await;

    // Without persistence the registry starts empty.
    let hub = Hub::start(HubConfig {
        mqtt_port: 0,
        https_port: 0,
        state_dir: dir,
        ..HubConfig::default()
    })
    .await
    .unwrap();
    assert!(hub.control().device_info("keep").is_none());
    stop(hub).await;
}

#[tokio::test]
async fn c2d_feedback_receive_abandon_complete() {
    let hub = start_hub().await;
    let (http, base, auth) = (http(&hub), base_url(&hub), service_auth(&hub, "service"));
    hub.create_device("fb").unwrap();
    let feedback = format!("{base}/messages/serviceBound/feedback?{API}");
    let get = || http.get(&feedback).header("Authorization", &auth).send();
    assert_eq!(get().await.unwrap().status(), 204, "no feedback yet");
    // Purged messages: `full` and `negative` ask for that outcome, `positive` and `none`
    // do not.
    for ack in ["full", "negative", "positive", "none"] {
        hub.control()
            .send_c2d(
                "fb",
                C2dRequest {
                    message_id: Some(format!("m-{ack}")),
                    ack: Some(ack.into()),
                    ..C2dRequest::default()
                },
            )
            .unwrap();
    }
    let r = http
        .delete(format!("{base}/devices/fb/commands?{API}"))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let r = get().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.microsoft.iothub.feedback.json"
    );
    let token = r.headers()["etag"].to_str().unwrap().to_string();
    let batch_id = r.headers()["iothub-messageid"].clone();
    assert_eq!(r.headers()["iothub-deliverycount"], "1");
    let records: Vec<Value> = r.json().await.unwrap();
    let outcomes: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["originalMessageId"].as_str().unwrap(),
                r["statusCode"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(outcomes, [("m-full", "Purged"), ("m-negative", "Purged")]);
    assert_eq!(records[0]["deviceId"], "fb");
    assert_eq!(get().await.unwrap().status(), 204, "the batch is locked");

    let at = |token: &str, suffix: &str| {
        format!(
            "{base}/messages/serviceBound/feedback/{}{suffix}?{API}",
            token.trim_matches('"')
        )
    };
    let r = http
        .post(at(&token, "/abandon"))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = get().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["iothub-messageid"], batch_id);
    assert_eq!(r.headers()["iothub-deliverycount"], "2");
    let again = r.headers()["etag"].to_str().unwrap().to_string();
    assert_ne!(again, token);
    // The abandoned lock is gone; the new one completes the batch, once.
    for (t, status) in [(&token, 412), (&again, 204), (&again, 412)] {
        let r = http
            .delete(at(t, ""))
            .header("Authorization", &auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "complete {t}");
        if status == 412 {
            assert_eq!(error_code(&r.json().await.unwrap()), 412002);
        }
    }
    assert_eq!(get().await.unwrap().status(), 204);
    // ServiceConnect is needed.
    let r = http
        .get(&feedback)
        .header("Authorization", service_auth(&hub, "registryRead"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    stop(hub).await;
}

#[tokio::test]
async fn twin_query_paging_rights_and_refusals() {
    let hub = start_hub().await;
    let (http, base) = (http(&hub), base_url(&hub));
    let read = service_auth(&hub, "registryRead");
    for (id, site) in [
        ("q1", "north"),
        ("q2", "south"),
        ("q3", "north"),
        ("q4", "north"),
    ] {
        hub.create_device(id).unwrap();
        let r = http
            .patch(format!("{base}/twins/{id}?{API}"))
            .header("Authorization", service_auth(&hub, "iothubowner"))
            .json(&json!({"tags": {"site": site}, "properties": {"desired": {"rate": 1}}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let url = format!("{base}/devices/query?{API}");
    let query = |auth: &str, text: &str, max: Option<&str>, token: Option<&str>| {
        let mut req = http
            .post(&url)
            .header("Authorization", auth)
            .json(&json!({ "query": text }));
        if let Some(m) = max {
            req = req.header("x-ms-max-item-count", m);
        }
        if let Some(t) = token {
            req = req.header("x-ms-continuation", t);
        }
        req.send()
    };
    let ids = |items: &[Value]| -> Vec<String> {
        items
            .iter()
            .map(|t| t["deviceId"].as_str().unwrap().to_string())
            .collect()
    };

    // SELECT * pages through whole twins, as GET /twins returns them.
    let text = "SELECT * FROM devices WHERE tags.site = 'north'";
    let r = query(&read, text, Some("2"), None).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ms-item-type"], "twin");
    let token = r.headers()["x-ms-continuation"]
        .to_str()
        .unwrap()
        .to_string();
    let page: Vec<Value> = r.json().await.unwrap();
    assert_eq!(ids(&page), ["q1", "q3"]);
    let twin: Value = http
        .get(format!("{base}/twins/q1?{API}"))
        .header("Authorization", &read)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page[0], twin);
    let r = query(&read, text, Some("2"), Some(&token)).await.unwrap();
    assert!(r.headers().get("x-ms-continuation").is_none());
    assert_eq!(ids(&r.json::<Vec<Value>>().await.unwrap()), ["q4"]);
    let r = query(&read, text, Some("2"), Some("")).await.unwrap();
    assert_eq!(ids(&r.json::<Vec<Value>>().await.unwrap()), ["q1", "q3"]);

    // Projections and counts are `json` items.
    let r = query(
        &read,
        "SELECT deviceId, tags.site FROM devices WHERE deviceId IN ('q2')",
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.headers()["x-ms-item-type"], "json");
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!([{"deviceId": "q2", "site": "south"}])
    );
    let r = query(
        &read,
        "SELECT tags.site, COUNT() AS n FROM devices GROUP BY tags.site",
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!([{"site": "north", "n": 3}, {"site": "south", "n": 1}])
    );

    // Registry read rights, as GET /devices; ServiceConnect alone is not enough.
    for (policy, status) in [
        ("iothubowner", 200),
        ("registryReadWrite", 200),
        ("service", 401),
        ("device", 401),
    ] {
        let r = query(
            &service_auth(&hub, policy),
            "SELECT * FROM devices",
            None,
            None,
        )
        .await
        .unwrap();
        assert_eq!(r.status(), status, "{policy}");
    }

    // Refusals: outside the subset, a bad token, a bad page size, a bad body.
    for (text, max, token, code) in [
        ("SELECT * FROM devices.modules", None, None, 400000),
        ("SELECT * FROM devices WHERE", None, None, 400000),
        ("SELECT * FROM devices", None, Some("garbage"), 400000),
        ("SELECT * FROM devices", Some("0"), None, 400004),
        ("SELECT * FROM devices", Some("x"), None, 400004),
    ] {
        let r = query(&read, text, max, token).await.unwrap();
        assert_eq!(r.status(), 400, "{text}");
        if code == 400000 {
            assert_eq!(r.headers()["iothub-errorcode"], "BadRequest");
        }
        assert_eq!(error_code(&r.json().await.unwrap()), code, "{text}");
    }
    let r = http
        .post(&url)
        .header("Authorization", &read)
        .body("{\"q\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(&r.json().await.unwrap()), 400006);
    stop(hub).await;
}
