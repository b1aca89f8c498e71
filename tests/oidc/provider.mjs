// A real OpenID Connect provider (the npm package oidc-provider) for Den's login tests.
//
//   node tests/oidc/provider.mjs
//
// Environment: OIDC_PORT (listens on 127.0.0.1), OIDC_CLIENT_ID, OIDC_CLIENT_SECRET,
// OIDC_REDIRECT_URI (Den's /auth/callback), OIDC_ACCOUNTS (JSON: login -> {email, name,
// groups}; other logins get <login>@example.org and no groups). Its bundled development
// login and consent pages take any login and any password; the login becomes the subject.
// Prints "oidc-provider ready <issuer>" once it listens.
import Provider from 'oidc-provider';

const port = Number(process.env.OIDC_PORT);
const issuer = `http://127.0.0.1:${port}`;
const accounts = JSON.parse(process.env.OIDC_ACCOUNTS || '{}');

const provider = new Provider(issuer, {
  clients: [{
    client_id: process.env.OIDC_CLIENT_ID,
    client_secret: process.env.OIDC_CLIENT_SECRET,
    redirect_uris: [process.env.OIDC_REDIRECT_URI],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  }],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  cookies: { keys: ['den-test-only-cookie-key'] },
  async findAccount(ctx, id) {
    const a = accounts[id] || {};
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: a.email || `${id}@example.org`,
          email_verified: true,
          name: a.name || id,
          preferred_username: id,
          groups: a.groups || [],
        };
      },
    };
  },
});
provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider ready ${issuer}`);
});
