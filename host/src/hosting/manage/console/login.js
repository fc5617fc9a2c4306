"use strict";
// Why the login page was shown again, from the redirect's query.
const params = new URLSearchParams(location.search);
const message = document.getElementById("message");
if (params.has("failed")) message.textContent = "That token is not one of this host's tenants'.";
if (params.has("expired")) message.textContent = "That login link was used already or has expired; log in with the token, or make a new link.";
document.getElementById("token").focus();
