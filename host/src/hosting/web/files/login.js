"use strict";
// Why the login page was shown again, from the redirect's query.
const params = new URLSearchParams(location.search);
const form = document.getElementById("login");
const message = document.getElementById("message");
// Each login page says in its form's data-* what a refusal means there.
if (params.has("failed")) message.textContent = form.dataset.failed;
if (params.has("expired")) message.textContent = form.dataset.expired;
form.querySelector("input").focus();
