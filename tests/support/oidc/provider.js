// A real OpenID Connect provider (panva's oidc-provider) for Graft's single sign-on tests.
// Usage: node provider.js PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI
// One confidential client (client_secret_basic), PKCE required (S256), in-memory accounts, and the package's
// development interactions: a login form (any password; the login is the account's sub) and a consent form,
// which the tests submit with an HTTP client. Prints "listening ISSUER" once it accepts connections.
import http from 'node:http';

import Provider from 'oidc-provider';

const [port, clientId, clientSecret, redirectUri] = process.argv.slice(2);
if (!port || !clientId || !clientSecret || !redirectUri) {
  console.error('usage: node provider.js PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI');
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}`;

const ACCOUNTS = {
  'bob-sub': { email: 'bob@example.org', email_verified: true, preferred_username: 'bob', name: 'Bob' },
  'eve-sub': { email: 'eve@example.org', email_verified: false, preferred_username: 'eve', name: 'Eve' },
  'carol-sub': { email: 'Carol@Example.org', email_verified: true, preferred_username: 'carol', name: 'Carol' },
  // a second "bob" by preferred_username: auto-creation must pick another free name
  'robert-sub': { email: 'robert@example.org', email_verified: true, preferred_username: 'bob', name: 'Robert' },
};

const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: [redirectUri],
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  pkce: { required: () => true },
  scopes: ['openid', 'email', 'profile'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['preferred_username', 'name'],
  },
  cookies: { keys: ['graft-tests-only-not-a-secret'] },
  async findAccount(ctx, sub) {
    const account = ACCOUNTS[sub];
    if (!account) return undefined;
    return { accountId: sub, async claims() { return { sub, ...account }; } };
  },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

http.createServer(provider.callback()).listen(Number(port), '127.0.0.1', () => {
  console.log(`listening ${issuer}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
