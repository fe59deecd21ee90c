// Shared by the labelling and admin pages: once the server has ended the session, the page says so instead of
// leaving stale work on screen. `advice` tells this page's user how to come back.
function showSignedOut(advice) {
  const notice = document.createElement("main");
  notice.className = "notice";
  const title = document.createElement("h1");
  title.textContent = "Signed out";
  const text = document.createElement("p");
  text.textContent = advice;
  notice.append(title, text);
  document.body.replaceChildren(notice);
}
